"""``MegakernelDecoder`` on a verify pass: several new tokens a request, one task-graph row each, found from
vLLM's query start locations (``bridge.request_rows``)."""

from types import SimpleNamespace

import pytest
import torch

from tests.megakernel.conftest import TINY, random_weights, vllm_model
from vllm_mirage.megakernel import bridge


def test_each_token_finds_its_request_and_first_row():
    qsl = torch.tensor([0, 4, 5, 8], dtype=torch.int32)
    request, first = bridge.request_rows(qsl, 8)
    assert request.tolist() == [0, 0, 0, 0, 1, 2, 2, 2]
    assert first.tolist() == [0, 0, 0, 0, 4, 5, 5, 5] and first.dtype == torch.int32
    # A CUDA graph's padded requests repeat the last location: no token falls into them.
    request, first = bridge.request_rows(torch.tensor([0, 4, 8, 8, 8], dtype=torch.int32), 8)
    assert request.tolist() == [0] * 4 + [1] * 4 and first.tolist() == [0] * 4 + [4] * 4


@pytest.fixture
def step(monkeypatch):
    """A verify pass's forward context as vLLM's GPU runner has it, for the bridge's first layer."""
    import vllm.forward_context

    weights = random_weights(**TINY, dtype=torch.float32)
    decoder = bridge.MegakernelDecoder(vllm_model(weights), max_batch=8, max_query=bridge.MAX_QUERY_ROWS)
    name = decoder.attn_layers[0].layer_name
    meta = SimpleNamespace(max_query_len=4, num_actual_tokens=6, query_start_loc=torch.tensor([0, 4, 6]),
                           block_table=torch.tensor([[3, 9], [7, 12]], dtype=torch.int32))
    ctx = SimpleNamespace(slot_mapping={name: torch.arange(100, 106)})
    monkeypatch.setattr(bridge, "step_attention_metadata", lambda layer: meta)
    monkeypatch.setattr(vllm.forward_context, "get_forward_context", lambda: ctx)
    return SimpleNamespace(decoder=decoder, meta=meta)


def test_a_verify_pass_runs_as_rows_of_its_requests(step):
    positions = torch.tensor([20, 21, 22, 23, 7, 8])
    batch = step.decoder.decode_batch(positions)
    assert batch.first_rows.tolist() == [0, 0, 0, 0, 4, 4]
    assert batch.block_tables.tolist() == [[3, 9]] * 4 + [[7, 12]] * 2
    assert batch.slot_mapping.tolist() == list(range(100, 106)) and batch.positions is positions


def test_long_queries_and_large_steps_are_not_the_graphs(step):
    step.meta.max_query_len = bridge.MAX_QUERY_ROWS + 1  # a prefill chunk: stock's, without a word
    assert step.decoder.decode_batch(torch.arange(6)) is None and step.decoder.declined() == []
    step.meta.max_query_len, step.meta.num_actual_tokens = 4, 12
    step.meta.query_start_loc = torch.tensor([0, 4, 8, 12])
    assert step.decoder.decode_batch(torch.arange(12)) is None
    assert step.decoder.declined() == ["verify pass of 12 tokens > 8"]


def test_a_model_that_does_not_verify_on_the_graph_leaves_multi_token_steps_alone(step):
    step.decoder.max_query = 1  # the default: only a self-draft's target takes verify passes
    assert step.decoder.decode_batch(torch.arange(6)) is None and step.decoder.declined() == []

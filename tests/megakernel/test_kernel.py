"""The persistent kernel against the layerwise reference, in Triton's interpreter (one worker)."""

import pytest
import torch

from tests.megakernel.conftest import (
    TINY, attention_last_row_first, clone_batch, float32_weights, random_batch, random_weights, request_rows_batch,
    row_by_row,
)
from tests.ops.conftest import rel_err
from vllm_mirage.megakernel import kernel, reference
from vllm_mirage.megakernel.graph import build_task_graph
from vllm_mirage.megakernel.state import DecodeBuffers

# ‖out − ref‖/‖ref‖. bf16 is looser in the interpreter, which truncates fp32→bf16 (tests/ops/conftest.py),
# here at every rounding point of two layers.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def _poison(buffers):
    for t in (buffers.res[1:], buffers.sumsq[1:], buffers.qkv, buffers.attn, buffers.act, buffers.logits,
              buffers.hidden_out):
        if t is not None:
            t.fill_(float("nan"))


@pytest.mark.parametrize("early_weights", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "positions, lm_head, layout, block_n_out, block_n_qkv, attn_splits, gu_tasks, fused_down",
    [
        ([0], True, "flash", 32, 0, 1, 0, False),
        # 128 hidden features: 8 output tiles, 8 sums of squares per row
        ([5, 37, 16], True, "fa_packed", 16, 0, 1, 0, False),
        # 256 q|k|v features: five 48-row QKV tiles in 64-row blocks, and 16 rows
        ([20], True, "flash", 32, 48, 1, 0, False),
        # 70 cached tokens: three 32-token chunks over 16-token pages
        ([9, 70], False, "head_major", 16, 0, 1, 0, False),
        ([33, 2], True, "head_major", 32, 0, 1, 0, False),
        # Context splits: 200 tokens in 4 slices of two 32-token chunks (the last: 8 and the new token);
        # 70 in 2 slices; 0 leaves every slice but the last empty, and 9 the second of 2 (the new token only).
        ([200, 0], True, "fa_packed", 32, 0, 4, 0, False),
        ([70, 9], False, "flash", 16, 0, 2, 0, False),
        # GU tasks of several slices (200 intermediate features: 7 slices of 32 in 3 tasks of 3/2/2),
        # each one tile of four slices' strided rows, the slices past a task's own masked off.
        ([12, 50], True, "fa_packed", 16, 0, 1, 3, False),
        # ... in 4 tasks of 2/2/2/1: two-slice tiles, as Qwen3-1.7B's on 132 SMs, with half-width chunks.
        ([3], True, "flash", 32, 0, 1, 4, False),
        # DOWN's weights in the GU tasks (200 intermediate features: the last slice of 32 is 8 wide),
        # DOWN tasks adding their fixed-point sums; two layers, so the sums are zeroed between them.
        ([7], True, "flash", 16, 0, 1, 0, True),
        ([40, 3], False, "fa_packed", 32, 0, 2, 0, True),
    ],
)
def test_kernel_matches_reference(positions, lm_head, layout, block_n_out, block_n_qkv, attn_splits, gu_tasks,
                                  fused_down, dtype, early_weights):
    weights = random_weights(**TINY, dtype=dtype)
    batch = random_batch(positions, layers=TINY["layers"], hkv=TINY["hkv"], d=TINY["d"], dtype=dtype, layout=layout)
    hidden = torch.randn(len(positions), TINY["hidden"]).to(dtype)
    before = clone_batch(batch)
    # The reference in float32 on the same (rounded) inputs: both sides' own rounding shows as error.
    want_batch = clone_batch(batch, torch.float32)
    weights32 = float32_weights(weights)
    want = reference.decode_step(weights32, want_batch, hidden.float(), lm_head)

    shape = weights.shape(batch=len(positions), lm_head=lm_head, block_n_out=block_n_out, block_n_qkv=block_n_qkv,
                          attn_splits=attn_splits, gu_tasks=gu_tasks, fused_down=fused_down)
    graph = build_task_graph(shape, 1)
    buffers = DecodeBuffers(shape, dtype, "cpu")
    _poison(buffers)
    buffers.load_input(hidden)
    out = kernel.decode_step(graph, weights, batch, buffers, config=kernel.LaunchConfig(early_weights=early_weights))

    assert out.shape == want.shape and not out.isnan().any(), "unwritten output"
    assert rel_err(out, want) <= TOLERANCE[dtype], rel_err(out, want)
    assert buffers.counters.tolist() == graph.stage_counts.tolist()  # every task signalled once
    assert (buffers.arrivals == (attn_splits if attn_splits > 1 else 0)).all()  # every split arrived once
    if fused_down:
        assert not buffers.down_acc.any()  # the last layer's DOWN tasks left the sum zeroed
    for got, ref, old in zip(batch.k_caches + batch.v_caches, want_batch.k_caches + want_batch.v_caches,
                             before.k_caches + before.v_caches):
        for b, pos in enumerate(positions):
            slot = (int(batch.block_tables[b, pos // 16]), pos % 16)
            assert rel_err(got[slot], ref[slot]) <= TOLERANCE[dtype]
        # Nothing but the new tokens' slots was written.
        changed = (got != old).any(dim=(2, 3)).nonzero().tolist()
        assert {tuple(c) for c in changed} <= {(int(batch.block_tables[b, p // 16]), p % 16)
                                               for b, p in enumerate(positions)}


@pytest.mark.parametrize("attn_splits", [1, 2])
def test_rows_of_one_request_attend_causally(attn_splits):
    # A verify pass (graph.py's executor checks the same): rows of one request see the request's earlier
    # rows of the step from the q|k|v buffer, since their cache slots are stored by other ATTN tasks of
    # the same stage. The queue runs each layer's ATTN tasks last row first, so a row that read them from
    # the cache would read what the slots held before.
    weights = random_weights(**TINY, dtype=torch.float32)
    batch = request_rows_batch([(37, 4), (0, 3), (5, 1)], layers=TINY["layers"], hkv=TINY["hkv"], d=TINY["d"],
                               dtype=torch.float32, layout="fa_packed")
    hidden = torch.randn(8, TINY["hidden"])
    expected_batch = clone_batch(batch)
    want = row_by_row(weights, expected_batch, hidden)
    shape = weights.shape(batch=8, attn_splits=attn_splits)
    graph = attention_last_row_first(build_task_graph(shape, 1))
    buffers = DecodeBuffers(shape, torch.float32, "cpu")
    _poison(buffers)
    buffers.load_input(hidden)
    out = kernel.decode_step(graph, weights, batch, buffers)
    assert rel_err(out, want) <= TOLERANCE[torch.float32], rel_err(out, want)
    for got, ref in zip(batch.k_caches + batch.v_caches, expected_batch.k_caches + expected_batch.v_caches):
        assert rel_err(got, ref) <= TOLERANCE[torch.float32]


def test_padding_of_a_verify_graph_reads_from_position_zero_on():
    # A full CUDA graph replayed for fewer requests than it was captured for: the padding rows hold stale
    # positions (here 0) and slot -1, and vLLM's padded query start locations group them as one request.
    # Their "earlier rows" would start before position 0; the kernel bounds them, and they store nothing.
    weights = random_weights(**TINY, dtype=torch.float32)
    batch = request_rows_batch([(37, 4), (0, 4)], layers=TINY["layers"], hkv=TINY["hkv"], d=TINY["d"],
                               dtype=torch.float32)
    batch.slot_mapping[4:], batch.positions[4:] = -1, 0
    hidden = torch.randn(8, TINY["hidden"])
    expected_batch = clone_batch(batch)
    want = row_by_row(weights, expected_batch, hidden)[:4]  # the padding rows store nothing there either
    before = clone_batch(batch)
    shape = weights.shape(batch=8)
    buffers = DecodeBuffers(shape, torch.float32, "cpu")
    buffers.load_input(hidden)
    out = kernel.decode_step(build_task_graph(shape, 1), weights, batch, buffers)
    assert rel_err(out[:4], want) <= TOLERANCE[torch.float32] and out.isfinite().all()
    real_slots = {(int(batch.block_tables[i, p // 16]), int(p) % 16) for i, p in enumerate(batch.positions[:4])}
    for got, old in zip(batch.k_caches, before.k_caches):
        assert {tuple(c) for c in (got != old).any(dim=(2, 3)).nonzero().tolist()} <= real_slots


def test_empty_slices_do_not_wait():
    # A context slice with no cached token (not the last) needs nothing from this step, so its task must
    # not wait for the QKV stage: that is what frees its worker for the next task's early weights. One
    # worker whose queue runs those tasks before any QKV task would spin forever if they waited.
    import threading

    from vllm_mirage.megakernel.graph import INDEX, TYPE, Task, TaskGraph

    weights = random_weights(**TINY, dtype=torch.float32)
    positions = [9, 40]  # 4 slices of whole 32-token chunks: 9 leaves slices 1 and 2 empty, 40 slice 2
    batch = random_batch(positions, layers=TINY["layers"], hkv=TINY["hkv"], d=TINY["d"], dtype=torch.float32)
    hidden = torch.randn(len(positions), TINY["hidden"])
    shape = weights.shape(batch=len(positions), attn_splits=4)
    graph = build_task_graph(shape, 1)

    def is_empty(task):
        b, _, split = shape.attn_task(int(graph.tasks[task, INDEX]))
        per = -(-(-(-positions[b] // 4)) // kernel.ATTN_CHUNK) * kernel.ATTN_CHUNK  # the kernel's slices
        return split < 3 and min(split * per, positions[b]) == positions[b]

    empty = [t for t in graph.queue.tolist() if graph.tasks[t, TYPE] == Task.ATTN and is_empty(t)]
    assert len(empty) == TINY["layers"] * TINY["hkv"] * 3
    queue = torch.tensor(empty + [t for t in graph.queue.tolist() if t not in empty], dtype=torch.int32)
    reordered = TaskGraph(shape, graph.tasks, queue, graph.queue_offsets, graph.stage_counts)

    outs = {}
    for name, g in (("in order", graph), ("empty first", reordered)):
        run_batch = clone_batch(batch)
        buffers = DecodeBuffers(shape, torch.float32, "cpu")
        buffers.load_input(hidden)
        run = threading.Thread(target=lambda: outs.__setitem__(name, kernel.decode_step(g, weights, run_batch,
                                                                                        buffers).clone()),
                               daemon=True)  # a waiting task would spin forever: do not keep pytest alive
        run.start()
        run.join(timeout=600)
        assert not run.is_alive(), f"{name}: the step did not finish (an empty slice waited for QKV)"
    assert torch.equal(outs["in order"], outs["empty first"])


def test_padding_rows_store_nothing():
    # vLLM pads decode batches up to a CUDA-graph size with slot -1 rows: they must not touch the cache.
    weights = random_weights(**TINY, dtype=torch.float32)
    batch = random_batch([7, 0], layers=TINY["layers"], hkv=TINY["hkv"], d=TINY["d"], dtype=torch.float32)
    batch.slot_mapping[1] = -1
    before = clone_batch(batch)
    shape = weights.shape(batch=2)
    buffers = DecodeBuffers(shape, torch.float32, "cpu")
    buffers.load_input(torch.randn(2, TINY["hidden"]))
    kernel.decode_step(build_task_graph(shape, 1), weights, batch, buffers)
    for got, old in zip(batch.k_caches, before.k_caches):
        changed = {tuple(c) for c in (got != old).any(dim=(2, 3)).nonzero().tolist()}
        assert changed == {(int(batch.block_tables[0, 0]), 7)}


def test_unsupported_shapes_are_refused():
    weights = random_weights(**TINY, dtype=torch.float32)
    batch = random_batch([3], layers=TINY["layers"], hkv=TINY["hkv"], d=TINY["d"], dtype=torch.float32,
                         block_size=8)
    shape = weights.shape(batch=1)
    graph, buffers = build_task_graph(shape, 1), DecodeBuffers(shape, torch.float32, "cpu")
    # The bridge asks for the reason (and falls back); direct callers get the ValueError.
    assert kernel.shape_unsupported_reason(shape, 8, torch.float32) == "KV-cache block size 8 must be a power of two ≥ 16"
    assert kernel.unsupported_reason(graph, weights, batch, buffers) == kernel.shape_unsupported_reason(
        shape, 8, torch.float32)
    assert kernel.shape_unsupported_reason(shape, 16, torch.float32) is None
    with pytest.raises(ValueError, match="block size 8"):
        kernel.decode_step(graph, weights, batch, buffers)


def test_non_contiguous_weights_are_refused():
    # The tiles step through a weight's rows by the row length: a strided view would be read wrongly.
    weights = random_weights(**TINY, dtype=torch.float32)
    weights.o[1] = weights.o[1].t().contiguous().t()
    graph = build_task_graph(weights.shape(batch=1), 1)
    with pytest.raises(ValueError, match="o weights must be contiguous"):
        kernel.encode_program(graph, weights)


@pytest.mark.parametrize("dtype, hq, hkv, hidden",
                         [("bf16", 16, 8, 1024), ("fp16", 32, 8, 4096), ("bf16", 40, 8, 4096)])
def test_kernel_compiles_for_hopper(dtype, hq, hkv, hidden):
    """The interpreter cannot show what a GPU build does: compile for sm_90 ahead of time (no GPU
    needed) at Qwen3-0.6B / 8B / 14B head counts, and check the spin-waits are real acquire loads and
    release adds (a plain load could be hoisted out of the loop, a relaxed add would publish early), and
    that the weight streams are what made the kernel fast on the H100: asynchronous copies (Triton's
    software pipelining) and 16-byte vector loads. The first version had neither (scalar 2-byte loads
    through an unaligned pointer table) and ran at 14% of the bandwidth floor. At hidden size 1024 every
    thread polls with its own acquire load (LaunchConfig.thread_polls); above 2048 one thread does."""
    info = _compile_for_hopper(dtype, hq, hkv, 1, hidden)
    assert info["acquire_loads"] >= 1 and info["release_adds"] >= 1, info
    assert info["shared_bytes"] <= 227 * 1024 and info["cubin_bytes"] > 0, info
    assert info["async_copies"] > 0 and info["vector_loads"] > 0, info
    # Each QKV / O / GU / LM task's first weight chunks are requested before its spin-wait
    # (LaunchConfig.early_weights, the default): four loops. A barrier inside the weight loop, as the wait
    # first had there, makes Triton drop the pipelining without a word; the count then falls.
    assert info["early_weight_copies"] > 0 and info["early_weight_loops"] == 4, info
    # Batch 1 splits attention over the context; the merge must follow an acquire-release arrival.
    assert info["attn_splits"] > 1 and info["arrival_adds"] >= 1, info


def test_multi_slice_gu_tasks_compile_pipelined_for_hopper():
    """At batch 8 on 132 SMs a GU task covers several slices in one loop (gemv_tiles._gemv_tiles, one tile of
    all of their rows): that loop must still be software-pipelined with its first weight chunks
    requested before the wait, or the reason for having it is gone."""
    info = _compile_for_hopper("bf16", 32, 8, 8)
    assert info["gu_tiles_early_copies"] > 0 and info["shared_bytes"] <= 227 * 1024, info


def _compile_for_hopper(*args) -> dict:
    """What tests/megakernel/compile_for_hopper.py reports for ``args`` (DTYPE HQ HKV [BATCH [HIDDEN ...]]), run in
    a process of its own: the jit decorator reads TRITON_INTERPRET, which the rest of the suite sets."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import subprocess_env

    script = Path(__file__).with_name("compile_for_hopper.py")
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

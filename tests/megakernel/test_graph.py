from dataclasses import replace

import pytest
import torch

from tests.megakernel.conftest import (
    TINY, attention_last_row_first, clone_batch, random_batch, random_weights, request_rows_batch, row_by_row,
)
from vllm_mirage.megakernel import reference
from vllm_mirage.megakernel.graph import (
    MAX_ATTN_SPLITS, MAX_GU_TILES, NO_WAIT, SIGNAL_STAGE, TYPE, WAIT_COUNT, WAIT_STAGE, DecodeShape, Task,
    build_task_graph,
)
from vllm_mirage.megakernel.state import DecodeBuffers


def _setup(positions, dtype=torch.float32):
    weights = random_weights(**TINY, dtype=dtype)
    batch = random_batch(positions, layers=TINY["layers"], hkv=TINY["hkv"], d=TINY["d"], dtype=dtype)
    hidden = torch.randn(len(positions), TINY["hidden"]).to(dtype)
    return weights, batch, hidden


@pytest.mark.parametrize("workers", [1, 3, 132])
def test_graph_covers_each_task_once_in_stage_order(workers):
    shape = DecodeShape(hidden=1024, intermediate=3072, num_heads=16, num_kv_heads=8, head_dim=128,
                        num_layers=28, vocab=151936, batch=8)
    g = build_task_graph(shape, workers)
    tasks = g.tasks.tolist()
    assert sorted(g.queue.tolist()) == list(range(len(tasks)))
    per_layer = sum(shape.tasks_in_stage(t) for t in list(Task)[:5])
    assert len(tasks) == 28 * per_layer + shape.tasks_in_stage(Task.LM)
    assert shape.tasks_in_stage(Task.QKV) == (16 + 16) * 128 // 32 and shape.tasks_in_stage(Task.ATTN) == 64
    counts = g.stage_counts.tolist()
    for row in tasks:
        if row[WAIT_STAGE] == NO_WAIT:
            assert row[TYPE] == Task.QKV and row[SIGNAL_STAGE] == 0
        else:
            # Each task waits for all of the stage right before its own.
            assert row[WAIT_STAGE] == row[SIGNAL_STAGE] - 1 and row[WAIT_COUNT] == counts[row[WAIT_STAGE]]
    for w in range(workers):
        stages = [tasks[t][SIGNAL_STAGE] for t in g.worker_queue(w)]
        assert stages == sorted(stages)


@pytest.mark.parametrize(
    "workers, lm_head, block_n_out, block_n_qkv, attn_splits, gu_tasks, fused_down",
    [(1, True, 32, 0, 1, 0, False), (2, True, 16, 0, 1, 0, False), (5, False, 32, 48, 1, 0, False),
     (64, True, 16, 0, 1, 0, False), (3, True, 32, 0, 4, 0, False), (7, False, 16, 0, 2, 0, False),
     # 7 GU slices in 3 tasks of 3/2/2, or 5 of 2/2/1/1/1
     (3, True, 32, 0, 1, 3, False), (2, False, 16, 0, 2, 5, False),
     (1, True, 16, 0, 1, 0, True), (5, False, 32, 0, 2, 0, True)],  # DOWN's weights in the GU tasks
)
def test_graph_executes_to_the_layerwise_step(workers, lm_head, block_n_out, block_n_qkv, attn_splits, gu_tasks,
                                              fused_down):
    weights, batch, hidden = _setup([0, 5, 37])
    expected_batch = clone_batch(batch)
    expected = reference.decode_step(weights, expected_batch, hidden, lm_head)
    shape = weights.shape(batch=3, lm_head=lm_head, block_n_out=block_n_out, block_n_qkv=block_n_qkv,
                          attn_splits=attn_splits, gu_tasks=gu_tasks, fused_down=fused_down)
    graph = build_task_graph(shape, workers)
    buffers = DecodeBuffers(shape, torch.float32, "cpu")
    buffers.load_input(hidden)
    logits = reference.run_graph(graph, weights, batch, buffers)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(batch.k_caches + batch.v_caches, expected_batch.k_caches + expected_batch.v_caches):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert buffers.counters.tolist() == graph.stage_counts.tolist()


@pytest.mark.parametrize("workers, attn_splits, reverse", [(1, 1, True), (5, 1, False), (3, 4, False), (1, 2, True)])
def test_rows_of_one_request_are_its_successive_decode_steps(workers, attn_splits, reverse):
    # A verify pass: 4 new tokens of a request with 37 cached (the cache holds none of the 4), 1 of one with
    # 5, 3 of one with nothing cached. Each row must see its request's earlier rows of the step, which no
    # cache slot holds before their own ATTN tasks run: with ``reverse`` every layer's ATTN tasks run last
    # row first, so a row that read them from the cache (or dropped them) would give other logits.
    weights = random_weights(**TINY, dtype=torch.float32)
    batch = request_rows_batch([(37, 4), (5, 1), (0, 3)], layers=TINY["layers"], hkv=TINY["hkv"], d=TINY["d"],
                               dtype=torch.float32)
    hidden = torch.randn(8, TINY["hidden"])
    expected_batch = clone_batch(batch)
    want = row_by_row(weights, expected_batch, hidden)
    shape = weights.shape(batch=8, attn_splits=attn_splits)
    buffers = DecodeBuffers(shape, torch.float32, "cpu")
    buffers.load_input(hidden)
    graph = build_task_graph(shape, workers)
    if reverse:
        graph = attention_last_row_first(graph)
    logits = reference.run_graph(graph, weights, batch, buffers)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(batch.k_caches + batch.v_caches, expected_batch.k_caches + expected_batch.v_caches):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_a_queue_out_of_stage_order_is_a_deadlock():
    weights, batch, hidden = _setup([3])
    shape = weights.shape(batch=1)
    graph = build_task_graph(shape, 2)
    graph.queue = graph.queue.flip(0)  # each worker now starts with the lm_head, which waits on the rest
    buffers = DecodeBuffers(shape, torch.float32, "cpu")
    buffers.load_input(hidden)
    with pytest.raises(RuntimeError, match="deadlocks"):
        reference.run_graph(graph, weights, batch, buffers)


def test_a_missing_dependency_gives_wrong_logits():
    # The CPU executor runs whatever a counter allows: a graph whose QKV tiles ignore the previous
    # layer's down_proj reads stale inputs, and the comparison with the layerwise step catches it.
    weights, batch, hidden = _setup([4, 9])
    expected = reference.decode_step(weights, clone_batch(batch), hidden)
    shape = weights.shape(batch=2)
    graph = build_task_graph(shape, 1)
    layer1_qkv = (graph.tasks[:, TYPE] == Task.QKV) & (graph.tasks[:, 1] == 1)
    graph.tasks[layer1_qkv, WAIT_STAGE] = NO_WAIT
    # Run layer 1's QKV first, as a worker with no wait would be free to.
    order = torch.cat([layer1_qkv.nonzero().flatten(), (~layer1_qkv).nonzero().flatten()]).to(torch.int32)
    graph.queue = order
    buffers = DecodeBuffers(shape, torch.float32, "cpu")
    buffers.res.zero_()  # stale but finite
    buffers.sumsq.fill_(1.0)
    buffers.load_input(hidden)
    logits = reference.run_graph(graph, weights, batch, buffers)
    assert not torch.allclose(logits, expected, rtol=1e-3, atol=1e-3)


def test_narrow_tiles_only_where_a_stage_would_idle_half_the_sms():
    qwen3_06b = DecodeShape(hidden=1024, intermediate=3072, num_heads=16, num_kv_heads=8, head_dim=128,
                            num_layers=28, vocab=151936, batch=1)
    shape = qwen3_06b.for_workers(132)
    # 0.6B: 1024 hidden features are 32 tiles of 32, a quarter of the SMs; 64 tiles of 16 (tl.dot's minimum).
    assert shape.block_n_out == 16 and shape.out_tiles == 64
    assert shape.tasks_in_stage(Task.O) == shape.tasks_in_stage(Task.DOWN) == 64
    assert shape.block_n == 32  # 96 GU tiles: more than half the SMs busy
    qwen3_8b = DecodeShape(hidden=4096, intermediate=12288, num_heads=32, num_kv_heads=8, head_dim=128,
                           num_layers=36, vocab=151936, batch=1)
    big = qwen3_8b.for_workers(132)
    # 8B keeps 32-row tiles everywhere: 16-row QKV/GU tiles measured 8.4 ms per step against 6.4 (H100).
    assert (big.block_n, big.block_n_out, big.out_tiles) == (32, 32, 128)
    # ... except QKV: 6144 features in 32-row tiles take two rounds over 132 SMs, in 48-row tiles one.
    assert (big.qkv_rows, big.tasks_in_stage(Task.QKV)) == (48, 128)
    # 384 GU slices, from batch 8 in one task per worker, each over every 132nd slice (three, or two
    # for the last twelve); at batch 1 one task per slice.
    assert big.tasks_in_stage(Task.GU) == 384 and big.gu_tiles(5) == range(5, 6)
    big8 = replace(qwen3_8b, batch=8).for_workers(132)
    assert big8.tasks_in_stage(Task.GU) == 132 and big8.gu_tiles(0) == range(0, 384, 132)
    assert [len(big8.gu_tiles(i)) for i in (0, 119, 120, 131)] == [3, 3, 2, 2]
    assert replace(qwen3_06b, batch=8).for_workers(132).gu_tasks == 0  # 0.6B: fewer slices than SMs
    # 1.7B's 192 slices: at most two a task, so several-slice tasks from batch 1.
    qwen3_17b = DecodeShape(hidden=2048, intermediate=6144, num_heads=16, num_kv_heads=8, head_dim=128,
                            num_layers=28, vocab=151936, batch=1).for_workers(132)
    assert qwen3_17b.tasks_in_stage(Task.GU) == 132 and max(len(qwen3_17b.gu_tiles(i)) for i in range(132)) == 2
    # No task takes more than MAX_GU_TILES slices: 25600 features are 800 slices, 200 tasks of four.
    huge = DecodeShape(hidden=5120, intermediate=25600, num_heads=64, num_kv_heads=8, head_dim=128,
                       num_layers=64, vocab=151936, batch=8).for_workers(132)
    assert huge.gu_tasks == 200 and {len(huge.gu_tiles(i)) for i in range(200)} == {MAX_GU_TILES}
    assert shape.qkv_rows == 32 and shape.tasks_in_stage(Task.QKV) == 128  # 0.6B: one round already
    wide = DecodeShape(hidden=5120, intermediate=25600, num_heads=64, num_kv_heads=8, head_dim=128,
                       num_layers=64, vocab=151936, batch=1).for_workers(132)
    assert wide.qkv_rows == 32  # 32B: one round would need 80-row tiles; two rounds stay as they are


def test_attention_splits_fill_one_round_of_workers():
    def splits(batch, hkv=8, workers=132):
        return DecodeShape(hidden=1024, intermediate=3072, num_heads=16, num_kv_heads=hkv, head_dim=128,
                           num_layers=2, vocab=64, batch=batch).for_workers(workers).attn_splits

    assert splits(1) == MAX_ATTN_SPLITS == 16  # 8 kv heads: 8 tasks for 132 SMs without splits
    assert (splits(2), splits(4), splits(8), splits(16), splits(64)) == (8, 4, 2, 1, 1)  # b8: two splits fill 128
    assert splits(1, workers=4) == 1
    shape = DecodeShape(hidden=1024, intermediate=3072, num_heads=16, num_kv_heads=8, head_dim=128,
                        num_layers=2, vocab=64, batch=3, attn_splits=4)
    assert shape.tasks_in_stage(Task.ATTN) == 96
    # Splits of one head are adjacent: round-robin puts them on neighbouring workers.
    assert [shape.attn_task(i) for i in (0, 3, 4, 95)] == [(0, 0, 0), (0, 0, 3), (0, 1, 0), (2, 7, 3)]

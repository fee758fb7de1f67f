"""The task graph of one Qwen3 decode step: tile-sized tasks, stage counters, per-worker queues.

A decode step for ``B`` requests (one new token each) is lowered, layer by layer, into tasks:

    QKV    norm(residual) @ W_qkv.T, one ``qkv_rows`` slice of the fused q|k|v features
    ATTN   one (request, kv head, context split): q/k RMSNorm + rotary, paged decode attention over
           one ``attn_splits``-th of the cached tokens; the last split also appends k/v to the cache
           and attends to the new token, and whichever split of a head finishes last combines them
    O      residual += attn @ W_o.T, one ``block_n_out`` slice of the hidden features
    GU     SiLU(norm(residual) @ W_gate.T) * (norm(residual) @ W_up.T), one ``block_n`` slice, or with
           ``gu_tasks`` set, the slices i, i + gu_tasks, i + 2 gu_tasks, ... (see gu_tiles)
    DOWN   residual += act @ W_down.T, one ``block_n_out`` slice of the hidden features; with
           ``fused_down``, GU tasks multiply their own act slice by W_down's matching columns and add
           the products into a fixed-point accumulator, and DOWN only adds that sum to the residual
    LM     final norm(residual) @ W_lm_head.T, one ``block_n_lm`` slice of the vocabulary
    NORM   (instead of LM, when vLLM's own lm_head/logits processor should run) final norm, one request

Dependencies are counted per stage: a task waits until the stage before it has finished all of its
tasks (a counter in global memory reaches the stage's task count), then bumps its own stage's counter
when done. Every stage reads all of the previous stage's output (a norm needs the whole row, attention
needs all of q, k and v), so a per-stage counter loses nothing at these dependencies; finer-grained
edges (e.g. O tiles per attention head group) are the next refinement.

O and DOWN tiles finish their features completely (no split-K; with ``fused_down`` the GU tasks split
DOWN's product over the intermediate size, in integers, and a DOWN tile finishes from their sum): they
add the residual, store the new residual stream and the sum of squares of their columns, one float32
per (column tile, request). The
next norm's consumers (QKV, GU, LM or NORM tasks) add those few partial sums in a fixed order to get
the row's RMS, so no task re-reads a whole row before its weight stream starts and no extra stage is
needed for the norm. O and DOWN use narrower tiles (``block_n_out``) where the hidden size would
otherwise leave SMs idle.

Tasks are dealt round-robin to ``num_workers`` queues in stage order. A worker only ever waits for an
earlier stage, and every earlier-stage task precedes it in every queue, so with all workers resident
(grid ≤ SMs) the step cannot deadlock; :func:`vllm_mirage.megakernel.reference.run_graph` checks that
by simulation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import torch


class Task(enum.IntEnum):
    QKV = 0
    ATTN = 1
    O = 2
    GU = 3
    DOWN = 4
    LM = 5
    NORM = 6


MAX_ATTN_SPLITS = 16  # see DecodeShape._attn_splits
MAX_GU_TILES = 4  # slices per multi-slice GU task: its accumulators, gate and up, are [16, 4 · block_n] each
STAGES_PER_LAYER = 5  # QKV, ATTN, O, GU, DOWN; LM (or NORM) is one stage after the last layer
NO_WAIT = -1

# Columns of the task table.
TYPE, LAYER, INDEX, WAIT_STAGE, WAIT_COUNT, SIGNAL_STAGE = range(6)


@dataclass(frozen=True)
class DecodeShape:
    """One tensor-parallel rank's view of a Qwen3 decode step."""

    hidden: int  # H
    intermediate: int  # I (this rank's shard)
    num_heads: int  # Hq (this rank's)
    num_kv_heads: int  # Hkv (this rank's)
    head_dim: int  # D
    num_layers: int
    vocab: int  # lm_head rows (this rank's shard)
    batch: int  # B requests, one token each
    block_n: int = 32  # output features per GU task, and per QKV task unless block_n_qkv says otherwise
    block_n_out: int = 32  # hidden features per O / DOWN task (and columns per sum-of-squares partial)
    block_n_lm: int = 64
    block_n_qkv: int = 0  # q|k|v features per QKV task, a multiple of 16; 0: block_n (see for_workers)
    attn_splits: int = 1  # ATTN tasks per (request, kv head), each over a slice of the context; a power of 2
    gu_tasks: int = 0  # GU tasks, each over every gu_tasks-th block_n slice; 0: one task per slice
    lm_head: bool = True  # end with logits (LM tasks) or with the final-normed hidden states (NORM tasks)
    fused_down: bool = False  # GU tasks also run DOWN's weights (split over the intermediate size), see above

    def for_workers(self, workers: int) -> "DecodeShape":
        """Halve the GEMV tiles (down to 16, ``tl.dot``'s minimum) while a stage would leave over half of
        the workers without a task (Qwen3-0.6B: 1024 hidden features = 32 tiles of 32). Only then: a
        16-row tile streams half the bytes per chunk, and on Qwen3-8B (QKV and GU at 16 rows to even out
        the rounds) it measured 8.4 ms per step instead of 6.4 (docs/design.md). The other per-worker
        choices are made here too: context splits, one-round QKV tiles, multi-slice GU tasks, ``fused_down``."""
        def fit(block: int, features: int) -> int:
            while block > 16 and -(-features // block) * 2 <= workers:
                block //= 2
            return block

        block_n = fit(self.block_n, min(self.qkv_features, self.intermediate))
        shape = replace(self, block_n=block_n, block_n_out=fit(self.block_n_out, self.hidden),
                        block_n_qkv=self._one_round_qkv(block_n, workers), attn_splits=self._attn_splits(workers))
        # Several GU slices per task (gu_tiles) where slices outnumber workers: the task loads each
        # activation chunk once for all of them. On the H200 (docs/design.md) two slices a task
        # (Qwen3-1.7B) beat one task per slice at every batch timed (b1 9%, b4 2%); three (8B, a tile of
        # 4 × 32 rows in 128-byte runs of each weight row) pay only from batch 8 (b1 2% slower, b4 level).
        # DOWN's weights in the GU tasks where those fit one round, at batch 1-2. Qwen3-0.6B's 96 GU tasks
        # on 132 SMs ran 3.6% / 4.7% faster alone (1.2% inside vLLM at b1), level at b4; Qwen3-1.7B's 192
        # take two rounds and ran 7% / 5% slower. On the H200 0.6B: 2.4% faster at b1, 0.9% slower at b2.
        fused = self.fused_down or (shape.gu_slices <= workers and self.batch <= 2)
        many = shape.gu_slices > workers and not fused and (self.batch >= 8 or shape.gu_slices <= 2 * workers)
        gu_tasks = max(workers, -(-shape.gu_slices // MAX_GU_TILES)) if many else 0
        return replace(shape, gu_tasks=gu_tasks, fused_down=fused)

    def _attn_splits(self, workers: int) -> int:
        """Context splits per (request, kv head): doubled up to ``MAX_ATTN_SPLITS`` while the ATTN stage
        still fits in one round. At batch 1 one task per kv head is 8 tasks for 132 SMs, each walking the
        whole context alone (8.2 µs per layer at 128 tokens, docs/design.md). vLLM replays one CUDA
        graph per batch size whatever the context, so the count cannot follow the context. With
        32-token chunks (attention_tile.ATTN_CHUNK) 16 splits cost what 4 do at 128 tokens and are 1.8× faster
        at 4096 (0.6B)."""
        splits = self.attn_splits
        while splits * 2 <= MAX_ATTN_SPLITS and self.batch * self.num_kv_heads * splits * 2 <= workers:
            splits *= 2
        return splits

    def _one_round_qkv(self, block_n: int, workers: int) -> int:
        """QKV rows per task: ``block_n``, unless that takes two rounds of tasks over the workers and up
        to twice as many rows (a multiple of 16) take one. Qwen3-8B's 6144 q|k|v features in 32-row
        tiles are 192 tasks for 132 SMs: a second round of 60 tasks while 72 SMs wait (the QKV stage
        ran at 1.65 TB/s, docs/design.md); 48-row tiles are 128 tasks, one round. Other stages
        keep power-of-two tiles: GU's would need 96 rows, its gate and up chunks then overflow shared
        memory."""
        if -(-self.qkv_features // block_n) <= workers:
            return 0
        rows = 16 * -(-self.qkv_features // (16 * workers))
        return rows if rows <= 2 * block_n else 0

    @property
    def gu_slices(self) -> int:
        return -(-self.intermediate // self.block_n)

    def gu_tiles(self, index: int) -> range:
        """The ``block_n`` slices GU task ``index`` computes. With ``gu_tasks`` (Qwen3-8B: 384 slices
        for 132 SMs) several, every gu_tasks-th, so that a worker streams its share of the weights in
        one pipelined loop and reads the activation once for all of them (gemv_tiles._gemv_tiles), not one
        task per slice, each ending in a release and starting with a pipeline to fill."""
        return range(index, self.gu_slices, self.gu_tasks) if self.gu_tasks else range(index, index + 1)

    def attn_task(self, index: int) -> tuple[int, int, int]:
        """(request, kv head, split) of ATTN task ``index``: the splits of one head are adjacent, so
        round-robin dealing puts them on neighbouring workers."""
        head, split = divmod(index, self.attn_splits)
        return (*divmod(head, self.num_kv_heads), split)

    @property
    def qkv_rows(self) -> int:
        return self.block_n_qkv or self.block_n

    @property
    def out_tiles(self) -> int:
        """Column tiles of the hidden features: O / DOWN tasks, and sum-of-squares partials per row."""
        return -(-self.hidden // self.block_n_out)

    @property
    def qkv_features(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def tasks_in_stage(self, task: Task) -> int:
        cdiv = lambda a, b: -(-a // b)  # noqa: E731
        return {
            Task.QKV: cdiv(self.qkv_features, self.qkv_rows),
            Task.ATTN: self.batch * self.num_kv_heads * self.attn_splits,
            Task.O: self.out_tiles,
            Task.GU: self.gu_tasks or self.gu_slices,
            Task.DOWN: self.out_tiles,
            Task.LM: cdiv(self.vocab, self.block_n_lm),
            Task.NORM: self.batch,
        }[task]

    @property
    def last(self) -> Task:
        return Task.LM if self.lm_head else Task.NORM

    @property
    def num_stages(self) -> int:
        return self.num_layers * STAGES_PER_LAYER + 1


def stage_of(task: Task, layer: int, shape: DecodeShape) -> int:
    return shape.num_layers * STAGES_PER_LAYER if task in (Task.LM, Task.NORM) else layer * STAGES_PER_LAYER + int(task)


@dataclass
class TaskGraph:
    shape: DecodeShape
    tasks: torch.Tensor  # int32 [num_tasks, 6], in stage order; columns TYPE ... SIGNAL_STAGE
    queue: torch.Tensor  # int32 [num_tasks]: task ids, worker w's run is queue[offsets[w]:offsets[w+1]]
    queue_offsets: torch.Tensor  # int32 [num_workers + 1]
    stage_counts: torch.Tensor  # int32 [num_stages]: tasks per stage (what a waiter waits for)

    @property
    def num_workers(self) -> int:
        return self.queue_offsets.numel() - 1

    def worker_queue(self, worker: int) -> list[int]:
        lo, hi = self.queue_offsets[worker].item(), self.queue_offsets[worker + 1].item()
        return self.queue[lo:hi].tolist()

    def to(self, device) -> "TaskGraph":
        return TaskGraph(self.shape, *(t.to(device) for t in (self.tasks, self.queue, self.queue_offsets,
                                                             self.stage_counts)))


def build_task_graph(shape: DecodeShape, num_workers: int) -> TaskGraph:
    if num_workers < 1:
        raise ValueError("num_workers must be at least 1")
    order = [(t, layer) for layer in range(shape.num_layers) for t in list(Task)[:STAGES_PER_LAYER]]
    order.append((shape.last, shape.num_layers - 1))
    rows, counts = [], []
    previous = None  # (stage, count) of the stage before
    for task, layer in order:
        n = shape.tasks_in_stage(task)
        stage = stage_of(task, layer, shape)
        wait_stage, wait_count = previous if previous else (NO_WAIT, 0)
        rows += [(int(task), layer, i, wait_stage, wait_count, stage) for i in range(n)]
        counts.append(n)
        previous = (stage, n)
    tasks = torch.tensor(rows, dtype=torch.int32)
    # Round-robin in stage order: each queue stays sorted by stage.
    queues = [list(range(w, len(rows), num_workers)) for w in range(num_workers)]
    offsets = [0]
    for q in queues:
        offsets.append(offsets[-1] + len(q))
    return TaskGraph(
        shape,
        tasks,
        torch.tensor([t for q in queues for t in q], dtype=torch.int32),
        torch.tensor(offsets, dtype=torch.int32),
        torch.tensor(counts, dtype=torch.int32),
    )

"""The persistent decode kernel: one launch runs a whole Qwen3 decode step from a task graph.

Each program is a worker that runs its own queue of tasks (see :mod:`vllm_mirage.megakernel.graph`),
encoded by the host with everything a task needs to start (its weight slice's address included), so
a worker reads its next task while the current one runs and no task starts with a chain of dependent
loads. For each task it spins on the counter of the stage it depends on (acquire, ``sync``), runs the
tile and bumps its own stage's counter (release). QKV, O, GU and LM tasks ask for their first weight
chunks before they spin: weights never depend on other tasks, so they stream while the worker waits
(``gemv_tiles._gemv_tile``, EARLY). The grid must not exceed what the GPU keeps resident at once (one
program per SM), or a waiting worker could hold the SM its producer needs.

The tiles are the fused ops' math at decode sizes (``gemv_tiles``): RMSNorm applied to each activation
chunk just before the dot (its RMS from the producers' per-tile sums of squares), SiLU·mul as the
gate/up epilogue, the residual add and its sums of squares as the O/DOWN epilogue; and attention tasks
per (request, kv head, context split) (``attention_tile``) that normalise and rotate q/k, append k/v to
vLLM's paged cache and attend over their share of the cached tokens, the last split also over the new
one (kept in registers, so no task reads what it just stored); where a head has several splits, the
last to finish merges them. Weights are addressed in place: they stay vLLM's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from vllm_mirage.megakernel.attention_tile import ATTN_CHUNK, _attention_tile
from vllm_mirage.megakernel.gemv_tiles import (
    MAX_FUSED_DOWN_BATCH, _down_part, _down_sum_tile, _gemv_tile, _gemv_tiles, _norm_row,
)
from vllm_mirage.megakernel.graph import INDEX, LAYER, TYPE, DecodeShape, Task, TaskGraph
from vllm_mirage.megakernel.state import DecodeBatch, DecodeBuffers, DecodeWeights
from vllm_mirage.megakernel.sync import _address, _read_task, _wait
from vllm_mirage.ops._dispatch import interpreted


@triton.jit
def _decode_step_kernel(
    program, queue_offsets, counters, trace,
    kvtab, cos_sin, positions, slot_mapping, block_tables, stride_bt, first_rows,
    res, sumsq, qkv_buf, attn_buf, act_buf, final_out, attn_acc, attn_ml, arrivals, down_ptrs, down_acc,
    H, I, V, NT, eps, scale, stride_blk, stride_tok, stride_head,
    B: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr, ATTN_SPLITS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_N_QKV: tl.constexpr, QKV_ROWS: tl.constexpr, BLOCK_N_OUT: tl.constexpr,
    BLOCK_N_LM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K_OUT: tl.constexpr, BLOCK_H: tl.constexpr,
    NT_P2: tl.constexpr, STAGES: tl.constexpr, EARLY: tl.constexpr, UPCAST: tl.constexpr, TRACE: tl.constexpr,
    GU_TASKS: tl.constexpr, GU_SLICES: tl.constexpr, GU_TILES: tl.constexpr, BLOCK_K_GU: tl.constexpr,
    EARLY_DOWN: tl.constexpr, POLLS: tl.constexpr,
    FUSED_DOWN: tl.constexpr, BLOCK_H_DOWN: tl.constexpr,
):
    dtype = qkv_buf.dtype.element_ty
    ptr = tl.pointer_type(dtype)
    NQKV: tl.constexpr = (HQ + 2 * HKV) * D
    NQ: tl.constexpr = HQ * D
    BH = B * H
    NTB = NT * B
    first = tl.load(queue_offsets + tl.program_id(0))
    end = tl.load(queue_offsets + tl.program_id(0) + 1)
    # Each task is read one task ahead, so none starts with a dependent load.
    n_kind, n_layer, n_index, n_wait, n_count, n_signal, n_weight, n_aux = _read_task(program, first, end)
    for qi in range(first, end):
        kind, layer, index, wait_stage, wait_count, signal, weight, aux = (
            n_kind, n_layer, n_index, n_wait, n_count, n_signal, n_weight, n_aux)
        n_kind, n_layer, n_index, n_wait, n_count, n_signal, n_weight, n_aux = _read_task(program, qi + 1, end)
        trace_row = trace + qi * 8  # see decode_step
        if TRACE:
            tl.store(trace_row, tl.extra.cuda.globaltimer())
        if kind == 6:  # NORM; the GEMV and attention tiles wait inside (see _gemv_tile, _attention_tile)
            _wait(counters, wait_stage, wait_count, trace_row, TRACE, True, POLLS)
        wt = _address(weight, ptr)
        if kind == 0:  # QKV: input norm of residual slot 2 layer, q|k|v features
            _gemv_tile(res + 2 * layer * BH, wt, B, H, NQKV, index * QKV_ROWS, qkv_buf + layer * B * NQKV,
                       _address(aux, ptr), sumsq + 2 * layer * NTB, NT, eps, res, sumsq,
                       counters, wait_stage, wait_count, trace_row,
                       True, False, False, UPCAST, BLOCK_T, BLOCK_N_QKV, QKV_ROWS, BLOCK_K, NT_P2, STAGES, EARLY,
                       TRACE, POLLS)
        elif kind == 1:  # ATTN (request, kv head, split) = graph.DecodeShape.attn_task; aux: q and k norm weights
            head = index // ATTN_SPLITS
            b = head // HKV
            row = layer * B + b
            pos = tl.load(positions + b)
            # A row of a full CUDA graph's padding holds stale entries (slot -1: it stores nothing); the
            # bound keeps what it reads at positions >= 0.
            earlier = tl.minimum(b - tl.load(first_rows + b), pos)
            _attention_tile(qkv_buf + row * NQKV, attn_buf + row * NQ, wt, _address(aux, ptr),
                            _address(tl.load(kvtab + layer * 2), ptr), _address(tl.load(kvtab + layer * 2 + 1), ptr),
                            block_tables + b * stride_bt, pos, tl.load(slot_mapping + b).to(tl.int64), earlier,
                            cos_sin, head % HKV, index % ATTN_SPLITS, eps, scale, stride_blk, stride_tok, stride_head,
                            attn_acc + row * HQ * ATTN_SPLITS * D, attn_ml + row * HQ * ATTN_SPLITS * 2,
                            arrivals + row * HKV + head % HKV, counters, wait_stage, wait_count, trace_row,
                            HQ, HKV, D, BLOCK_G, PAGE, BLOCK_S, ATTN_SPLITS, UPCAST, TRACE, POLLS)
        elif kind == 2:  # O: residual slot 2 layer + 1 = slot 2 layer + attn @ W_o.T, one column tile
            _gemv_tile(attn_buf + layer * B * NQ, wt, B, NQ, H, index * BLOCK_N_OUT, res + (2 * layer + 1) * BH,
                       wt, sumsq, NT, eps, res + 2 * layer * BH, sumsq + (2 * layer + 1) * NTB + index * B,
                       counters, wait_stage, wait_count, trace_row,
                       False, False, True, UPCAST, BLOCK_T, BLOCK_N_OUT, BLOCK_N_OUT, BLOCK_K_OUT, NT_P2, STAGES,
                       EARLY, TRACE, POLLS)
        elif kind == 3:  # GU: post-attention norm of slot 2 layer + 1, SiLU(gate) * up; DecodeShape.gu_tiles
            if GU_TASKS > 0:
                _gemv_tiles(res + (2 * layer + 1) * BH, wt, B, H, I, index * BLOCK_N, act_buf + layer * B * I,
                            _address(aux, ptr), sumsq + (2 * layer + 1) * NTB, NT, eps,
                            counters, wait_stage, wait_count, trace_row, tl.cdiv(GU_SLICES - index, GU_TASKS),
                            GU_TASKS * BLOCK_N, UPCAST, BLOCK_T, BLOCK_N, BLOCK_K_GU, NT_P2, STAGES, EARLY, TRACE,
                            POLLS, GU_TILES)
            else:
                if FUSED_DOWN:  # asked for now, so the address is there when the act slice is
                    w_down = _address(tl.load(down_ptrs + layer), ptr) + index * BLOCK_N
                _gemv_tile(res + (2 * layer + 1) * BH, wt, B, H, I, index * BLOCK_N, act_buf + layer * B * I,
                           _address(aux, ptr), sumsq + (2 * layer + 1) * NTB, NT, eps, res, sumsq,
                           counters, wait_stage, wait_count, trace_row,
                           True, True, False, UPCAST, BLOCK_T, BLOCK_N, BLOCK_N, BLOCK_K, NT_P2, STAGES, EARLY, TRACE,
                           POLLS)
                if FUSED_DOWN:
                    tl.debug_barrier()
                    _down_part(act_buf + layer * B * I + index * BLOCK_N, w_down, down_acc, I, H,
                               I - index * BLOCK_N, trace_row, B, BLOCK_N, BLOCK_H_DOWN, STAGES, TRACE)
        elif kind == 4 and FUSED_DOWN:  # DOWN: residual slot 2 layer + 2 = slot 2 layer + 1 + the GU tasks' sum
            _down_sum_tile(down_acc, res + (2 * layer + 1) * BH, res + (2 * layer + 2) * BH,
                           sumsq + (2 * layer + 2) * NTB + index * B, B, H, index * BLOCK_N_OUT,
                           counters, wait_stage, wait_count, trace_row, BLOCK_T, BLOCK_N_OUT, TRACE, POLLS)
        elif kind == 4:  # DOWN: residual slot 2 layer + 2 = slot 2 layer + 1 + act @ W_down.T
            _gemv_tile(act_buf + layer * B * I, wt, B, I, H, index * BLOCK_N_OUT, res + (2 * layer + 2) * BH,
                       wt, sumsq, NT, eps, res + (2 * layer + 1) * BH, sumsq + (2 * layer + 2) * NTB + index * B,
                       counters, wait_stage, wait_count, trace_row,
                       False, False, True, UPCAST, BLOCK_T, BLOCK_N_OUT, BLOCK_N_OUT, BLOCK_K_OUT, NT_P2, STAGES,
                       EARLY_DOWN, TRACE, POLLS)
        elif kind == 5:  # LM: final norm + lm_head slice into the logits; `layer` is the last layer
            _gemv_tile(res + (2 * layer + 2) * BH, wt, B, H, V, index * BLOCK_N_LM, final_out,
                       _address(aux, ptr), sumsq + (2 * layer + 2) * NTB, NT, eps, res, sumsq,
                       counters, wait_stage, wait_count, trace_row,
                       True, False, False, UPCAST, BLOCK_T, BLOCK_N_LM, BLOCK_N_LM, BLOCK_K, NT_P2, STAGES, EARLY, TRACE,
                       POLLS)
        else:  # NORM: final norm of request `index`, for vLLM's own lm_head
            _norm_row(res + (2 * layer + 2) * BH, sumsq + (2 * layer + 2) * NTB, _address(aux, ptr), final_out, index,
                      B, H, NT, eps, BLOCK_H, NT_P2)
        if TRACE:
            tl.store(trace_row + 2, tl.extra.cuda.globaltimer())
        tl.debug_barrier()
        tl.atomic_add(counters + signal, 1, sem="release")
        if TRACE:
            tl.store(trace_row + 3, tl.extra.cuda.globaltimer())
            tl.store(trace_row + 4, tl.extra.cuda.smid().to(tl.int64))


@dataclass(frozen=True)
class LaunchConfig:
    """Tunables of the persistent kernel; None: the default for the shape (:meth:`for_shape`), each
    measured on the H100 (docs/design.md)."""

    num_warps: int = 4
    # Weight chunk of tasks over the hidden size (QKV, GU, LM), at every shape: at batch 1 Qwen3-8B
    # 5.77 → 5.38 ms per step against 128; on 8B at batches 2-16 early weights lose with 128 and win with
    # 256; on small models above batch 1, once every thread polls, 256 is 3-5% faster
    # at 0.6B b2-b16 and 1-9% at 1.7B.
    block_k: int = 256
    block_k_out: int | None = None  # of O and DOWN, whose tiles have half the rows on small models
    stages: int = 3  # Triton's software pipelining: STAGES - 1 weight chunks in flight per GEMV task
    # A QKV, O, GU or LM task's first weight chunks are requested before its wait. O's gained only once
    # attention asked for its own HBM inputs before its wait: 8B 0.9-3.1% faster at batches 1-16, 0.6B
    # within +0.6%.
    early_weights: bool = True
    # DOWN's too (an experiment's switch). Alone, 8B b1 gains 0.6-0.8%, but inside vLLM the same build
    # ran 1.2% slower; 8B b8 loses 2-6% and 0.6B 1-2% (its activation by hand).
    early_down: bool = False
    # Every thread polls a stage counter with its own acquire load (_poll). None: on hidden sizes up to
    # 2048: 2-6% faster there at batches 1-2 (0.6B b1 0.843 -> 0.794 ms inside vLLM), level at 8-16;
    # 8B b8 lost 6.5% with it. No trace shows a shorter handoff: measured, not understood.
    thread_polls: bool | None = None
    # Cached tokens an ATTN task gathers per step of its loop (a multiple of the cache's block size).
    attn_chunk: int = ATTN_CHUNK

    def for_shape(self, shape: DecodeShape) -> "LaunchConfig":
        """The config with every None replaced by what measured fastest for ``shape``.

        O and DOWN chunks of 512 columns at batch 1 and 256 above it (H100, 512 there: 0.6B b8 +1.7%,
        1.7B b8 +7%; on the H200 512 is 6-7% faster at 0.6B and 1.7B b4-b16 and 7-12% slower at 8B b2-b16,
        so its table sets them per shape: ``DecodePlan.megakernel_launch``, docs/design.md)."""
        return replace(
            self,
            block_k_out=self.block_k_out or (512 if shape.batch == 1 else 256),
            thread_polls=shape.hidden <= 2048 if self.thread_polls is None else self.thread_polls,
        )


def encode_program(graph: TaskGraph, weights: DecodeWeights) -> torch.Tensor:
    """int64 [tasks, 8]: the graph's tasks in worker-queue order, each followed by two addresses: for
    GEMV tasks the first row of its weight slice and the norm weight (if any), for ATTN the q and k
    norm weights, for NORM the final norm. Built once: vLLM's weights do not move after start-up."""
    s = graph.shape
    for name in weights.PER_LAYER:
        for t in getattr(weights, name):
            if not t.is_contiguous():  # the tiles step through rows by their length
                raise ValueError(f"megakernel: {name} weights must be contiguous")
    order = graph.queue.long().cpu()
    tasks = graph.tasks.cpu()[order].long()
    kind, layer, index = tasks[:, TYPE], tasks[:, LAYER], tasks[:, INDEX]
    elem = weights.qkv[0].element_size()
    base = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)  # noqa: E731
    weight = torch.zeros_like(kind)
    aux = torch.zeros_like(kind)
    # (kind, weights per layer, rows per task, row length, norm weights per layer)
    gemv = [
        (Task.QKV, weights.qkv, s.qkv_rows, s.hidden, weights.input_norm),
        (Task.O, weights.o, s.block_n_out, s.num_heads * s.head_dim, None),
        (Task.GU, weights.gate_up, s.block_n, s.hidden, weights.post_norm),
        (Task.DOWN, weights.down, s.block_n_out, s.intermediate, None),
        (Task.LM, [weights.lm_head] * s.num_layers, s.block_n_lm, s.hidden, [weights.final_norm] * s.num_layers),
    ]
    for task, mats, rows, row_len, norms in gemv:
        m = kind == task
        weight[m] = base(mats)[layer[m]] + index[m] * rows * row_len * elem
        if norms is not None:
            aux[m] = base(norms)[layer[m]]
    m = kind == Task.ATTN
    weight[m], aux[m] = base(weights.q_norm)[layer[m]], base(weights.k_norm)[layer[m]]
    aux[kind == Task.NORM] = weights.final_norm.data_ptr()
    if ((weight % 16) != 0).any() or ((aux % 16) != 0).any():
        raise ValueError("megakernel: weights must start 16-byte aligned")
    program = torch.cat([tasks, weight[:, None], aux[:, None]], dim=1)
    return program.to(graph.tasks.device)


def shape_unsupported_reason(s: DecodeShape, block_size: int, dtype: torch.dtype) -> str | None:
    """Why this kernel cannot run shape ``s`` over KV-cache blocks of ``block_size`` tokens of ``dtype``
    activations, or None. It needs no GPU, so the bridge asks it on every platform before building a
    graph, and the CPU engine tests see the same decision the GPU makes."""
    if s.head_dim & (s.head_dim - 1) or s.head_dim < 32:
        return f"head_dim {s.head_dim} must be a power of two ≥ 32"
    if block_size & (block_size - 1) or block_size < 16:
        return f"KV-cache block size {block_size} must be a power of two ≥ 16"
    if s.fused_down and (s.gu_tasks or s.batch > MAX_FUSED_DOWN_BATCH):
        return (f"fused_down needs one GU slice per task (gu_tasks = 0) and a batch of at most "
                f"{MAX_FUSED_DOWN_BATCH}")
    if s.attn_splits & (s.attn_splits - 1) or s.attn_splits < 1:
        return f"attn_splits {s.attn_splits} must be a power of two"
    if s.num_heads % s.num_kv_heads:
        return "query heads must be a multiple of kv heads"
    if (s.hidden * dtype.itemsize) % 16 or (s.intermediate * dtype.itemsize) % 16:
        # Weight rows must start 16-byte aligned: the kernel tells Triton its weight loads are.
        return f"rows of {s.hidden} or {s.intermediate} elements are not 16-byte multiples"
    return None


def unsupported_reason(graph: TaskGraph, weights: DecodeWeights, batch: DecodeBatch,
                       buffers: DecodeBuffers) -> str | None:
    """Why this kernel cannot run this step, or None: :func:`shape_unsupported_reason` and what only the
    step's tensors tell (workers per SM, cache views, sizes, contiguity)."""
    s = graph.shape
    if buffers.qkv.is_cuda:
        sms = torch.cuda.get_device_properties(buffers.qkv.device).multi_processor_count
        if graph.num_workers > sms:
            # More workers than SMs can leave a producer unscheduled behind spinning consumers: a hang.
            return f"{graph.num_workers} workers for {sms} SMs could deadlock"
    reason = shape_unsupported_reason(s, batch.block_size, buffers.qkv.dtype)
    if reason is not None:
        return reason
    want = (s.num_kv_heads, s.head_dim)
    for cache in batch.k_caches + batch.v_caches:
        if cache.shape[2:] != want or cache.stride() != batch.k_caches[0].stride() or cache.stride(-1) != 1:
            return (f"KV caches must be [blocks, block_size, {want[0]}, {want[1]}] views with one set of "
                    "strides and a unit head-dim stride")
    if not (batch.positions.shape[0] == batch.slot_mapping.shape[0] == buffers.qkv.shape[1] == s.batch):
        return "batch size differs between graph, batch and buffers"
    if not weights.cos_sin_cache.is_contiguous():
        return "cos_sin_cache must be contiguous"
    for t in (weights.lm_head, weights.final_norm):
        if not t.is_contiguous():
            return "final norm and lm_head must be contiguous"
    return None


def check_supported(graph: TaskGraph, weights: DecodeWeights, batch: DecodeBatch, buffers: DecodeBuffers) -> None:
    """Raise ValueError with :func:`unsupported_reason`, for direct callers. Inside vLLM the bridge asks
    the reason first and serves the step with the fused layers instead."""
    reason = unsupported_reason(graph, weights, batch, buffers)
    if reason is not None:
        raise ValueError(f"megakernel: {reason}")


def kv_pointer_table(batch: DecodeBatch) -> torch.Tensor:
    """int64 [L, 2]: each layer's key and value cache base pointers."""
    rows = [[k.data_ptr(), v.data_ptr()] for k, v in zip(batch.k_caches, batch.v_caches)]
    return torch.tensor(rows, dtype=torch.int64, device=batch.k_caches[0].device)


def down_pointer_table(weights: DecodeWeights) -> torch.Tensor:
    """int64 [L]: each layer's W_down base pointer, for GU tasks of a ``fused_down`` graph."""
    return torch.tensor([t.data_ptr() for t in weights.down], dtype=torch.int64, device=weights.down[0].device)


def decode_step(graph: TaskGraph, weights: DecodeWeights, batch: DecodeBatch, buffers: DecodeBuffers,
                program: torch.Tensor | None = None, kvtab: torch.Tensor | None = None,
                config: LaunchConfig | None = None, trace: torch.Tensor | None = None,
                down_ptrs: torch.Tensor | None = None, zero_sync: bool = True) -> torch.Tensor:
    """Run one decode step with ``graph.num_workers`` persistent programs; returns ``buffers.logits``
    (or ``buffers.hidden_out`` for a graph built without the lm_head).

    ``buffers.load_input`` must have received the embedded tokens; or ``prologue.load_step_input``, which
    also zeroes the counters (``buffers.sync``), so that this need not (``zero_sync=False``).
    ``program`` (:func:`encode_program`),
    ``kvtab`` (:func:`kv_pointer_table`) and, for a ``fused_down`` graph, ``down_ptrs``
    (:func:`down_pointer_table`) may be built once and passed in (a CUDA-graph capture must): they
    change only when the weights or caches move. ``trace`` (int64 [tasks, 8], GPU only) receives, per
    task in queue order, globaltimer ns at: start, end of wait, end of compute, after its release; then
    its SM; GEMV tasks also record (6) the end of the RMS and (7) of the weight loop; ATTN tasks that
    attend (6) the end of the q/k norm and rotary, (7) of the attention, and with context splits (5) of
    the arrival; GU tasks of a ``fused_down`` graph (5) the end of their W_down loop.
    """
    s = graph.shape
    check_supported(graph, weights, batch, buffers)
    if program is None:
        program = encode_program(graph, weights)
    if kvtab is None:
        kvtab = kv_pointer_table(batch)
    if down_ptrs is None and s.fused_down:
        down_ptrs = down_pointer_table(weights)
    cache = batch.k_caches[0]
    out = buffers.logits if s.lm_head else buffers.hidden_out
    consts, num_warps = launch_constants(s, config or LaunchConfig(), batch.block_size,
                                         upcast=interpreted() or buffers.qkv.dtype == torch.float32,
                                         trace=trace is not None)
    if zero_sync:
        buffers.sync.zero_()
    _decode_step_kernel[(graph.num_workers,)](
        program, graph.queue_offsets, buffers.counters, buffers.counters if trace is None else trace,
        kvtab, weights.cos_sin_cache, batch.positions, batch.slot_mapping, batch.block_tables,
        batch.block_tables.stride(0), buffers.rows if batch.first_rows is None else batch.first_rows,
        buffers.res, buffers.sumsq, buffers.qkv, buffers.attn, buffers.act, out,
        buffers.attn_acc, buffers.attn_ml, buffers.arrivals,
        *((down_ptrs, buffers.down_acc) if s.fused_down else (kvtab, kvtab)),  # unread without fused_down
        s.hidden, s.intermediate, s.vocab, s.out_tiles, weights.eps, s.head_dim ** -0.5,
        cache.stride(0), cache.stride(1), cache.stride(2),
        **consts, num_warps=num_warps,
    )
    return out


def launch_constants(s: DecodeShape, config: LaunchConfig, block_size: int, upcast: bool,
                     trace: bool) -> tuple[dict, int]:
    """The kernel's compile-time arguments and warp count for shape ``s`` with KV-cache blocks of
    ``block_size`` tokens: what :func:`decode_step` launches, and what tests/megakernel/compile_for_hopper.py
    compiles ahead of time."""
    config = config.for_shape(s)
    block_t = min(64, max(16, triton.next_power_of_2(s.batch)))
    # Registers: a 64-token block quarters the weight chunks and takes 8 warps (else it spills).
    shrink = 1 if block_t <= 16 else block_t // 16
    block_k = max(32, min(config.block_k // shrink, triton.next_power_of_2(s.hidden)))
    block_k_out = max(32, min(config.block_k_out // shrink, triton.next_power_of_2(s.num_heads * s.head_dim)))
    num_warps = config.num_warps if block_t <= 32 else max(8, config.num_warps)
    # A multi-slice GU task's tile: its slices' rows, in chunks of a one-slice task's weight bytes.
    gu_tiles = triton.next_power_of_2(max(len(s.gu_tiles(0)), 1))
    consts = dict(
        # The batch as a constant: one build per CUDA-graph size. As an argument only batch 1 and multiples of
        # 16 let Triton fold the row masks (it specialises integers equal to 1 or divisible by 16); batches
        # 2-8 ran 1-11% slower on the H200 (docs/design.md).
        B=s.batch,
        HQ=s.num_heads, HKV=s.num_kv_heads, D=s.head_dim, PAGE=block_size, BLOCK_S=max(config.attn_chunk, block_size),
        BLOCK_G=max(16, triton.next_power_of_2(s.num_heads // s.num_kv_heads)), ATTN_SPLITS=s.attn_splits,
        BLOCK_T=block_t, BLOCK_N=s.block_n, BLOCK_N_QKV=triton.next_power_of_2(s.qkv_rows), QKV_ROWS=s.qkv_rows,
        BLOCK_N_OUT=s.block_n_out, BLOCK_N_LM=s.block_n_lm, BLOCK_K=block_k,
        BLOCK_K_OUT=block_k_out, BLOCK_H=triton.next_power_of_2(s.hidden),
        NT_P2=triton.next_power_of_2(s.out_tiles), STAGES=config.stages, EARLY=config.early_weights,
        GU_TASKS=s.gu_tasks, GU_SLICES=s.gu_slices, GU_TILES=gu_tiles, BLOCK_K_GU=max(32, block_k // gu_tiles),
        EARLY_DOWN=config.early_down,
        POLLS=config.thread_polls and not interpreted(),  # inline PTX
        FUSED_DOWN=s.fused_down,
        # W_down chunks of 16 KB (256 rows of 32 columns); 512 rows, all of a 0.6B task's in flight at once,
        # ran the same.
        BLOCK_H_DOWN=min(triton.next_power_of_2(s.hidden), 8192 // s.block_n),
        UPCAST=upcast, TRACE=trace,
    )
    return consts, num_warps

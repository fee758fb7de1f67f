"""The persistent decode kernel: one launch runs a whole Qwen3 decode step from a task graph.

Each program is a worker that runs its own queue of tasks (see :mod:`vllm_mirage.megakernel.graph`),
encoded by the host with everything a task needs to start (its weight slice's address included), so
a worker reads its next task while the current one runs and no task starts with a chain of dependent
loads. For each task it spins on the counter of the stage it depends on (acquire), runs the tile and
bumps its own stage's counter (release). QKV, O, GU and LM tasks ask for their first weight chunks
before they spin: weights never depend on other tasks, so they stream while the worker waits
(``_gemv_tile``, EARLY). The grid must not exceed what the GPU keeps resident at once (one program per
SM), or a waiting worker could hold the SM its producer needs.

The tiles are the fused ops' math at decode sizes: RMSNorm applied to each activation chunk just
before the dot (its RMS from the producers' per-tile sums of squares), SiLU·mul as the gate/up
epilogue, the residual add and its sums of squares as the O/DOWN epilogue, and attention tasks per
(request, kv head, context split) that normalise and rotate q/k, append k/v to vLLM's paged cache and
attend over their share of the cached tokens, the last split also over the new one (kept in registers,
so no task reads what it just stored); where a head has several splits, the last to finish merges
them. Weights are addressed in place: they stay vLLM's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from vllm_mirage.megakernel.graph import INDEX, LAYER, TYPE, DecodeShape, Task, TaskGraph
from vllm_mirage.megakernel.state import DOWN_FRACTION_BITS, DecodeBatch, DecodeBuffers, DecodeWeights
from vllm_mirage.ops._dispatch import interpreted
from vllm_mirage.ops._norm_gemv import _dot, _rms_scale, _silu_mul

# Cached tokens per step of an attention task's loop (at least one KV-cache block). The next chunk's
# keys and values wait in registers while this one is used; at 64 tokens that is 128 registers per
# thread in a kernel already at the 255 cap, and 16 context splits ran 5% slower than 4 at 128 cached
# tokens on Qwen3-0.6B (docs/design.md). At 32 they cost the same.
ATTN_CHUNK = 32

_DOWN_SCALE = tl.constexpr(2.0**DOWN_FRACTION_BITS)  # see DecodeBuffers.down_acc
MAX_FUSED_DOWN_BATCH = 4  # _down_part unrolls its requests


@triton.jit
def _address(value, ptr_type: tl.constexpr):
    """A pointer from an encoded address. Weight slices start 16-byte aligned (checked by
    :func:`encode_program`); saying so is what lets loads through them be 16-byte vectors."""
    return tl.multiple_of(value.to(ptr_type), 16)


@triton.jit
def _read_task(program, qi, end):
    """Entry ``qi`` of a worker's encoded queue (:func:`encode_program`): kind, layer, index, wait stage,
    wait count, signal stage, weight address, aux address. Past ``end``: kind -1, nothing to run."""
    row = program + qi * 8
    ok = qi < end
    return (tl.load(row, mask=ok, other=-1), tl.load(row + 1, mask=ok, other=0), tl.load(row + 2, mask=ok, other=0),
            tl.load(row + 3, mask=ok, other=-1), tl.load(row + 4, mask=ok, other=0), tl.load(row + 5, mask=ok, other=0),
            tl.load(row + 6, mask=ok, other=0), tl.load(row + 7, mask=ok, other=0))


@triton.jit
def _poll(counter, POLLS: tl.constexpr):
    """The counter's value, loaded with acquire semantics. Triton's scalar atomic has one thread load it
    and hand it to the others through shared memory, behind a CTA barrier, so every thread's later
    loads are ordered after the acquire. POLLS: every thread loads it itself (inline PTX, so not in
    Triton's interpreter), no hand-over."""
    if POLLS:
        seen = tl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [counter],
                                         dtype=tl.int32, is_pure=False, pack=1)
    else:
        seen = tl.atomic_add(counter, 0, sem="acquire")
    return seen


@triton.jit
def _wait(counters, stage, count, trace_row, TRACE: tl.constexpr, BARRIER: tl.constexpr = True,
          POLLS: tl.constexpr = False):
    """Spin until ``stage`` has signalled ``count`` tasks (acquire, ``_poll``); stage < 0: no wait.
    Returns the count seen (≥ 0), which callers put in the masks of the loads that must not start before
    it. With TRACE, the time the wait ended goes to ``trace_row[1]``.

    BARRIER adds a CTA barrier after the loop; inside a loop Triton is to pipeline, leave it out: any
    barrier in a loop stops Triton's pipeliner (seen in the sm_90 compile)."""
    seen = tl.full([], 0, tl.int32)
    if stage >= 0:
        seen = _poll(counters + stage, POLLS)
        while seen < count:
            seen = _poll(counters + stage, POLLS)
    if BARRIER:
        tl.debug_barrier()
    if TRACE:
        tl.store(trace_row + 1, tl.extra.cuda.globaltimer())
    return seen


@triton.jit
def _rstd(sumsq_ptr, NT, B, K, eps, offs_t, t_mask, NT_P2: tl.constexpr):
    """1 / RMS of rows ``offs_t`` of a residual slot, from its NT column tiles' sums of squares."""
    tiles = tl.arange(0, NT_P2)
    parts = tl.load(sumsq_ptr + tiles[:, None] * B + offs_t[None, :], mask=(tiles < NT)[:, None] & t_mask[None, :],
                    other=0.0, cache_modifier=".cg")
    return tl.rsqrt(tl.sum(parts, axis=0) / K + eps)


@triton.jit
def _add_residual(y, res, mask, sumsq_ptr, offs_t, t_mask, dtype: tl.constexpr):
    """res + y with the residual add's rounding (both already rounded to ``dtype``), and each row's sum
    of squares of it over the columns in ``mask``, stored at ``sumsq_ptr[row]``: the epilogue of a task
    that finishes hidden features (O, DOWN)."""
    y = (y.to(tl.float32) + res.to(tl.float32)).to(dtype)
    yf = tl.where(mask, y.to(tl.float32), 0.0)
    tl.store(sumsq_ptr + offs_t, tl.sum(yf * yf, axis=1), mask=t_mask)
    return y


# The tiles are device functions, not inlined into the kernel: ptxas then allocates each one's registers
# on its own (under the kernel's 255) instead of all task kinds' together. Inlined, the batch-1 kernel
# spilled 600 bytes and a change to one tile moved spills into another's weight loop; as functions, the
# H100's build reports no spills, and Qwen3-0.6B b1 / 8B b8 ran 2.6% / 1.3% faster
# (docs/design.md).
@triton.jit(noinline=True)
def _gemv_tile(
    x_ptr, w_ptr, B, K, N, n0, out_ptr,
    nw_ptr, sumsq_ptr, NT, eps,
    res_ptr, sumsq_out_ptr,
    counters, wait_stage, wait_count, trace_row,
    NORM_IN: tl.constexpr, SILU_MUL: tl.constexpr, ADD_RES: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, NT_P2: tl.constexpr,
    STAGES: tl.constexpr, EARLY: tl.constexpr, TRACE: tl.constexpr = False,
    POLLS: tl.constexpr = False,
):
    """out[:, n0:n0+ROWS] = f(x) @ W[n0:n0+ROWS].T for x [B, K], W [N (x2 with SILU_MUL), K];
    ``w_ptr`` points at row n0; ROWS ≤ BLOCK_N, the tile's power-of-two height. The task's wait
    (``_wait`` on ``wait_stage``) happens in here.

    NORM_IN: x is a residual slot and f its RMSNorm (weight ``nw``, RMS from ``sumsq_ptr``'s NT tiles).
    SILU_MUL: up rows follow the N gate rows; out = silu(gate) * up. ADD_RES: out = res + y, rounded,
    and each row's sum of squares over these columns goes to ``sumsq_out_ptr[row]``; ``res`` is loaded
    right after the wait, so it has arrived by the time the loop ends.

    EARLY: wait inside the first step of the weight loop. Triton's pipeliner issues the first
    STAGES - 1 weight chunks before the loop, so they stream while the worker waits for its producers
    (weights never depend on them). Every activation load (and ``res``) is masked by the count the
    wait returned: that data dependency keeps it, and the RMS, after the wait. Otherwise the wait
    comes first.
    """
    dtype = w_ptr.dtype.element_ty
    rows = tl.arange(0, BLOCK_N)
    offs_n = n0 + rows
    n_mask = (rows < ROWS) & (offs_n < N)
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * K
    seen = tl.full([], 0, tl.int32)
    if not EARLY:
        seen = _wait(counters, wait_stage, wait_count, trace_row, TRACE, True, POLLS)
    for t0 in range(0, B, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < B
        x_rows = x_ptr + offs_t[:, None] * K
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        if ADD_RES:
            if EARLY:  # loaded after the wait, in the loop's first step
                res = tl.zeros([BLOCK_T, BLOCK_N], dtype=dtype)
            else:
                res = tl.load(res_ptr + offs_t[:, None] * N + offs_n[None, :],
                              mask=t_mask[:, None] & n_mask[None, :], other=0.0, cache_modifier=".cg")
                # The epilogue's out_at / out_m, spelled out: computing them once up here changed the
                # whole sm_90 build (register numbering, order), and the build timed is this one.
        if SILU_MUL:
            acc_up = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        if NORM_IN or EARLY:  # the by-hand double buffer's state (see below)
            x = tl.zeros([BLOCK_T, BLOCK_K], dtype=dtype)
        if NORM_IN:
            rstd = tl.zeros([BLOCK_T, 1], dtype=tl.float32)
            nw = tl.zeros([BLOCK_K], dtype=dtype)
        # The weight stream is software-pipelined by Triton (cp.async, STAGES - 1 chunks ahead). So is
        # the activation of a task that waits first (DOWN). A normed one, or one that must not be asked
        # for before an EARLY task's wait (O), is double-buffered by hand, one chunk ahead: Triton does
        # not pipeline a load whose value is carried to the next step.
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            k = k0 + offs_k
            k_mask = k < K
            wm = n_mask[:, None] & k_mask[None, :]
            w = tl.load(w_rows + k[None, :], mask=wm, other=0.0)
            if SILU_MUL:
                w_up = tl.load(w_rows + N * K + k[None, :], mask=wm, other=0.0)
            if NORM_IN or EARLY:
                if k0 == 0:
                    if EARLY:
                        if t0 == 0:
                            seen = _wait(counters, wait_stage, wait_count, trace_row, TRACE, False, POLLS)
                    ready = offs_t < tl.where(seen >= 0, B, 0)  # = t_mask, once the wait is over
                    if NORM_IN:
                        rstd = _rstd(sumsq_ptr, NT, B, K, eps, offs_t, ready, NT_P2)[:, None]
                        if TRACE:  # "+ 0 * value": the stamp's store waits for the value it times
                            tl.store(trace_row + 6, tl.extra.cuda.globaltimer() + tl.sum(rstd).to(tl.int64) * 0)
                        nw = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0)
                    x = tl.load(x_rows + offs_k[None, :], mask=ready[:, None] & k_mask[None, :], other=0.0,
                                cache_modifier=".cg")
                    if ADD_RES:
                        res = tl.load(res_ptr + offs_t[:, None] * N + offs_n[None, :],
                                      mask=ready[:, None] & n_mask[None, :], other=0.0, cache_modifier=".cg")
                kn = k + BLOCK_K
                ready = offs_t < tl.where(seen >= 0, B, 0)
                x_next = tl.load(x_rows + kn[None, :], mask=ready[:, None] & (kn < K)[None, :], other=0.0,
                                 cache_modifier=".cg")
                if NORM_IN:
                    nw_next = tl.load(nw_ptr + kn, mask=kn < K, other=0.0)
                    a = _rms_scale(x, rstd, nw.to(tl.float32)[None, :], dtype)
                    nw = nw_next
                else:
                    a = x
                x = x_next
            else:
                a = tl.load(x_rows + k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0,
                            cache_modifier=".cg")
            acc += _dot(a, tl.trans(w), UPCAST)
            if SILU_MUL:
                acc_up += _dot(a, tl.trans(w_up), UPCAST)
        if TRACE:
            tl.store(trace_row + 7, tl.extra.cuda.globaltimer() + tl.sum(acc).to(tl.int64) * 0)
        if SILU_MUL:
            y = _silu_mul(acc, acc_up, dtype)
        else:
            y = acc
        y = y.to(dtype)
        out_m = t_mask[:, None] & n_mask[None, :]
        out_at = offs_t[:, None] * N + offs_n[None, :]
        if ADD_RES:
            y = _add_residual(y, res, out_m, sumsq_out_ptr, offs_t, t_mask, dtype)
        tl.store(out_ptr + out_at, y, mask=out_m)


@triton.jit(noinline=True)
def _down_part(act_ptr, w_ptr, acc_ptr, I, H, cols_left, trace_row,
               B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, STAGES: tl.constexpr,
               TRACE: tl.constexpr = False):
    """acc += act[:, :c] @ W_down[:, :c].T for the c = min(BLOCK_N, cols_left) intermediate features a
    GU task has just written (``act_ptr``, ``w_ptr``: their first column), in fixed point
    (``DecodeBuffers.down_acc``). W_down's rows stream BLOCK_H at a time; each request's products
    leave as relaxed atomic adds, one per row (the task's release orders them before its stage counter
    moves). On CUDA cores, request by request, unrolled (B is a constexpr: an inner loop would stop
    Triton pipelining the weight loop): fused_down is for a batch of a few, where a 16-row tl.dot
    would leave most of its rows, and their atomics, masked off. The act slice is read back
    (the caller's barrier makes every thread's stores visible): its load leaves with the first weight
    chunks."""
    cols = tl.arange(0, BLOCK_N)
    c_mask = cols < cols_left
    offs_h = tl.arange(0, BLOCK_H)
    for h0 in tl.range(0, H, BLOCK_H, num_stages=STAGES):
        h = h0 + offs_h
        h_mask = h < H
        w = tl.load(w_ptr + h[:, None].to(tl.int64) * I + cols[None, :], mask=h_mask[:, None] & c_mask[None, :],
                    other=0.0).to(tl.float32)
        for t in tl.static_range(B):
            a = tl.load(act_ptr + t * I + cols, mask=c_mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            part = tl.sum(w * a[None, :], axis=1)
            tl.atomic_add(acc_ptr + t * H + h, (part * _DOWN_SCALE).to(tl.int64), mask=h_mask, sem="relaxed")
    if TRACE:
        tl.store(trace_row + 5, tl.extra.cuda.globaltimer())


@triton.jit(noinline=True)
def _down_sum_tile(acc_ptr, res_ptr, out_ptr, sumsq_out_ptr, B, N, n0, counters, wait_stage, wait_count, trace_row,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, TRACE: tl.constexpr = False,
                   POLLS: tl.constexpr = False):
    """A DOWN task of a ``fused_down`` graph: out[:, n0:n0+BLOCK_N] = res + the GU tasks' fixed-point
    sum, rounded as a linear layer's output is, then as the residual add; each row's sum of squares
    over these columns (``_add_residual``, as O's and DOWN's GEMV epilogue). It zeroes the sum's columns for the next
    layer's GU tasks: they run after the next QKV stage, which waits for every DOWN task."""
    dtype = out_ptr.dtype.element_ty
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    _wait(counters, wait_stage, wait_count, trace_row, TRACE, True, POLLS)
    for t0 in range(0, B, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < B
        m = t_mask[:, None] & n_mask[None, :]
        at = offs_t[:, None] * N + offs_n[None, :]
        total = tl.load(acc_ptr + at, mask=m, other=0, cache_modifier=".cg")
        res = tl.load(res_ptr + at, mask=m, other=0.0, cache_modifier=".cg")
        tl.store(acc_ptr + at, tl.zeros_like(total), mask=m)
        y = _add_residual((total.to(tl.float32) * (1.0 / _DOWN_SCALE)).to(dtype), res, m, sumsq_out_ptr, offs_t,
                          t_mask, dtype)
        tl.store(out_ptr + at, y, mask=m)


@triton.jit(noinline=True)
def _gemv_tiles(
    x_ptr, w_ptr, B, K, N, n0, out_ptr,
    nw_ptr, sumsq_ptr, NT, eps,
    counters, wait_stage, wait_count, trace_row, tiles, tile_stride,
    UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NT_P2: tl.constexpr, STAGES: tl.constexpr, EARLY: tl.constexpr, TRACE: tl.constexpr = False,
    POLLS: tl.constexpr = False, TILES: tl.constexpr = 1,
):
    """What ``_gemv_tile`` computes for a GU task (NORM_IN, SILU_MUL), for the ``tiles`` ≤ TILES
    slices of BLOCK_N rows at n0, n0 + tile_stride, n0 + 2 tile_stride, ... (GU tasks of several
    slices, DecodeShape.gu_tiles; other arguments as for _gemv_tile) as one tile of TILES · BLOCK_N
    strided rows: each chunk of the normed activation is loaded once for all of the task's slices, not
    once per slice. A 16-row tile reads every request's row, so at batch 16 a slice by slice loop
    brought 8 KB of activation from L2 with every 32 KB of weights and ran 35% longer a slice than at
    batch 1; one tile for all slices made Qwen3-8B b8 / b16 6% faster and 1.7B 7-9% (H200,
    docs/design.md). BLOCK_K is the caller's, scaled so that a chunk holds as many weight bytes as a
    one-slice task's; rows of slices past ``tiles`` are masked off (no memory traffic). It stays apart
    from _gemv_tile, whose build every other task kind runs: a row map folded into that function is a
    change to every task's loop, to be timed before it is made."""
    dtype = w_ptr.dtype.element_ty
    ROWS: tl.constexpr = TILES * BLOCK_N
    rows = tl.arange(0, ROWS)
    tile = rows // BLOCK_N
    feature = tile * tile_stride + rows % BLOCK_N  # from n0
    n_mask = (tile < tiles) & (n0 + feature < N)
    w_rows = w_ptr + feature[:, None].to(tl.int64) * K
    offs_k = tl.arange(0, BLOCK_K)
    seen = tl.full([], 0, tl.int32)
    if not EARLY:
        seen = _wait(counters, wait_stage, wait_count, trace_row, TRACE, True, POLLS)
    for t0 in range(0, B, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < B
        x_rows = x_ptr + offs_t[:, None] * K
        acc = tl.zeros([BLOCK_T, ROWS], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_T, ROWS], dtype=tl.float32)
        rstd = tl.zeros([BLOCK_T, 1], dtype=tl.float32)  # the by-hand double buffer's state (see below)
        x = tl.zeros([BLOCK_T, BLOCK_K], dtype=dtype)
        nw = tl.zeros([BLOCK_K], dtype=dtype)
        # The weight stream is software-pipelined by Triton (cp.async, STAGES - 1 chunks ahead); the
        # normed activation is double-buffered by hand, one chunk ahead, as in _gemv_tile.
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            k = k0 + offs_k
            k_mask = k < K
            wm = n_mask[:, None] & k_mask[None, :]
            w = tl.load(w_rows + k[None, :], mask=wm, other=0.0)
            w_up = tl.load(w_rows + N * K + k[None, :], mask=wm, other=0.0)
            if k0 == 0:
                if EARLY:
                    if t0 == 0:
                        seen = _wait(counters, wait_stage, wait_count, trace_row, TRACE, False, POLLS)
                ready = offs_t < tl.where(seen >= 0, B, 0)  # = t_mask, once the wait is over
                rstd = _rstd(sumsq_ptr, NT, B, K, eps, offs_t, ready, NT_P2)[:, None]
                if TRACE:  # "+ 0 * value": the stamp's store waits for the value it times
                    tl.store(trace_row + 6, tl.extra.cuda.globaltimer() + tl.sum(rstd).to(tl.int64) * 0)
                nw = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0)
                x = tl.load(x_rows + offs_k[None, :], mask=ready[:, None] & k_mask[None, :], other=0.0,
                            cache_modifier=".cg")
            kn = k + BLOCK_K
            ready = offs_t < tl.where(seen >= 0, B, 0)
            x_next = tl.load(x_rows + kn[None, :], mask=ready[:, None] & (kn < K)[None, :], other=0.0,
                             cache_modifier=".cg")
            nw_next = tl.load(nw_ptr + kn, mask=kn < K, other=0.0)
            a = _rms_scale(x, rstd, nw.to(tl.float32)[None, :], dtype)
            nw = nw_next
            x = x_next
            acc += _dot(a, tl.trans(w), UPCAST)
            acc_up += _dot(a, tl.trans(w_up), UPCAST)
        if TRACE:
            tl.store(trace_row + 7, tl.extra.cuda.globaltimer() + tl.sum(acc).to(tl.int64) * 0)
        y = _silu_mul(acc, acc_up, dtype).to(dtype)
        out_m = t_mask[:, None] & n_mask[None, :]
        tl.store(out_ptr + offs_t[:, None] * N + (n0 + feature)[None, :], y, mask=out_m)


@triton.jit
def _norm_row(x_ptr, sumsq_ptr, w_ptr, out_ptr, b, B, K, NT, eps, BLOCK: tl.constexpr, NT_P2: tl.constexpr):
    """out = rmsnorm(x[b]) * w for one row (K ≤ BLOCK) of a residual slot, RMSNorm's rounding; the
    whole row in one load."""
    tiles = tl.arange(0, NT_P2)
    parts = tl.load(sumsq_ptr + tiles * B + b, mask=tiles < NT, other=0.0, cache_modifier=".cg")
    offs = tl.arange(0, BLOCK)
    m = offs < K
    xv = tl.load(x_ptr + b * K + offs, mask=m, other=0.0, cache_modifier=".cg")
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(parts, axis=0) / K + eps)
    tl.store(out_ptr + b * K + offs, _rms_scale(xv, rstd, w, out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _norm_rope_heads(x1, x2, w1, w2, cos, sin, eps, D: tl.constexpr):
    """Per-row RMSNorm over the two halves of a head, then neox rotary; rounded like qk_norm_rope."""
    dtype = x1.dtype
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, HALF)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / D + eps)[:, None]
    n1 = _rms_scale(x1f, rstd, w1.to(tl.float32)[None, :], dtype).to(tl.float32)
    n2 = _rms_scale(x2f, rstd, w2.to(tl.float32)[None, :], dtype).to(tl.float32)
    return (n1 * cos - n2 * sin).to(dtype), (n2 * cos + n1 * sin).to(dtype)


@triton.jit
def _kv_chunk(k_cache, v_cache, bt_ptr, j, start, end, kvh, stride_blk, stride_tok, stride_head,
              D: tl.constexpr, PAGE: tl.constexpr, BLOCK_S: tl.constexpr):
    """Keys and values (each as two head-dim halves) of cached tokens
    [start + j BLOCK_S, start + (j + 1) BLOCK_S) ∩ [start, end), gathered across ``PAGE``-token cache
    blocks; masked rows are zero."""
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, HALF)
    tok = start + j * BLOCK_S + tl.arange(0, BLOCK_S)
    tok_mask = tok < end
    page = tl.load(bt_ptr + tok // PAGE, mask=tok_mask, other=0).to(tl.int64)
    rows = (page * stride_blk + (tok % PAGE) * stride_tok + kvh * stride_head)[:, None] + d[None, :]
    m = tok_mask[:, None]
    return (tl.load(k_cache + rows, mask=m, other=0.0), tl.load(k_cache + rows + HALF, mask=m, other=0.0),
            tl.load(v_cache + rows, mask=m, other=0.0), tl.load(v_cache + rows + HALF, mask=m, other=0.0), tok_mask)


@triton.jit(noinline=True)  # see _gemv_tile
def _attention_tile(
    qkv_ptr, out_ptr, qw_ptr, kw_ptr, k_cache, v_cache, bt_ptr, pos, slot, earlier, cs_ptr, kvh, split, eps, scale,
    stride_blk, stride_tok, stride_head, part_acc, part_ml, arrivals, counters, wait_stage, wait_count, trace_row,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_S: tl.constexpr, SPLITS: tl.constexpr, UPCAST: tl.constexpr, TRACE: tl.constexpr,
    POLLS: tl.constexpr = False,
):
    """One row, one kv head, one of SPLITS slices of the context: q/k norm + rotary, attend over the
    slice's cached tokens; the last slice also stores k/v at ``slot`` and attends to the new token.

    ``earlier`` rows of the same request precede this one in the step, at positions ``pos - earlier`` to
    ``pos - 1`` (a verify pass: several new tokens a request). The cache holds only the tokens before
    them; their keys and values are this step's, stored by their own ATTN tasks in this same stage, so the
    last slice takes them from the q|k|v buffer instead (causal attention within the request).

    The cache is paged (``PAGE`` tokens per block); each step of the loop gathers ``BLOCK_S`` tokens
    across pages, one chunk ahead of its use. The first chunk, the rotary row and the q/k norm weights
    are requested before the wait: no task of this step writes them, and so they leave before the O
    weights that the worker's next task requests early (docs/design.md). Slices are whole
    chunks, so at short contexts the later slices hold no cached token. Such a slice (unless it is the
    last) needs nothing from this step: it leaves an empty part without waiting for the QKV stage (the
    task's wait is in here), so its worker goes straight on to its next task and that task's early
    weight loads.

    With SPLITS > 1 the slice's unnormalised output, running max and sum go to ``part_acc`` /
    ``part_ml`` ([HQ, SPLITS, D] / [HQ, SPLITS, 2] float32 of this request and layer), then the task
    bumps the head's ``arrivals`` counter (acquire-release); the task that brings it to SPLITS has seen
    every other slice's part and writes the merged output. So the output is complete before that task
    signals its stage, and the O stage, which waits for every ATTN task, reads it whole.
    """
    G: tl.constexpr = HQ // HKV
    HALF: tl.constexpr = D // 2
    cached = pos - earlier
    per = tl.cdiv(tl.cdiv(cached, SPLITS), BLOCK_S) * BLOCK_S
    start = tl.minimum(split * per, cached)
    end = tl.minimum(start + per, cached)
    last = split == SPLITS - 1
    d = tl.arange(0, HALF)
    g = tl.arange(0, BLOCK_G)
    g_mask = (g < G)[:, None]
    heads = kvh * G + g
    dst = out_ptr + heads[:, None] * D + d[None, :]
    dtype = out_ptr.dtype.element_ty
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_G, HALF], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_G, HALF], dtype=tl.float32)
    if (end > start) | last:
        kv0 = _kv_chunk(k_cache, v_cache, bt_ptr, 0, start, end, kvh, stride_blk, stride_tok, stride_head, D, PAGE,
                        BLOCK_S)
        cos = tl.load(cs_ptr + pos * D + d).to(tl.float32)[None, :]
        sin = tl.load(cs_ptr + pos * D + HALF + d).to(tl.float32)[None, :]
        nws = (tl.load(qw_ptr + d), tl.load(qw_ptr + HALF + d), tl.load(kw_ptr + d), tl.load(kw_ptr + HALF + d))
        _wait(counters, wait_stage, wait_count, trace_row, TRACE, True, POLLS)
        m_i, l_i, acc1, acc2 = _attend_slice(
            qkv_ptr, kv0, cos, sin, nws, k_cache, v_cache, bt_ptr, pos, slot, earlier, cs_ptr, kvh, heads, g_mask,
            start, end, last, eps, scale, stride_blk, stride_tok, stride_head, m_i, l_i, acc1, acc2, trace_row, HQ, HKV,
            D, PAGE, BLOCK_S, UPCAST, TRACE)
        if TRACE:
            tl.store(trace_row + 7, tl.extra.cuda.globaltimer() + tl.sum(l_i).to(tl.int64) * 0)
    elif TRACE:
        tl.store(trace_row + 1, tl.extra.cuda.globaltimer())
    if SPLITS == 1:
        tl.store(dst, (acc1 / l_i[:, None]).to(dtype), mask=g_mask)
        tl.store(dst + HALF, (acc2 / l_i[:, None]).to(dtype), mask=g_mask)
    else:
        part = heads * SPLITS + split
        tl.store(part_acc + part[:, None] * D + d[None, :], acc1, mask=g_mask)
        tl.store(part_acc + part[:, None] * D + HALF + d[None, :], acc2, mask=g_mask)
        tl.store(part_ml + part * 2, m_i, mask=g < G)
        tl.store(part_ml + part * 2 + 1, l_i, mask=g < G)
        tl.debug_barrier()  # every thread's part is stored before the arrival publishes it
        arrived = tl.atomic_add(arrivals, 1, sem="acq_rel")
        if TRACE:
            tl.store(trace_row + 5, tl.extra.cuda.globaltimer() + arrived.to(tl.int64) * 0)
        if arrived == SPLITS - 1:
            _merge_parts(part_acc, part_ml, out_ptr, kvh, dtype, G, D, SPLITS)


@triton.jit
def _attend_slice(
    qkv_ptr, kv0, cos, sin, nws, k_cache, v_cache, bt_ptr, pos, slot, earlier, cs_ptr, kvh, heads, g_mask,
    start, end, last, eps, scale, stride_blk, stride_tok, stride_head, m_i, l_i, acc1, acc2, trace_row,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_S: tl.constexpr,
    UPCAST: tl.constexpr, TRACE: tl.constexpr,
):
    """Online softmax of q heads ``heads`` (rows masked by ``g_mask``) of kv head ``kvh``, from the running
    max ``m_i``, sum ``l_i`` and unnormalised output halves ``acc1``/``acc2`` on, over cached tokens
    [start, end) and, if ``last``, over the request's ``earlier`` rows of this step (q|k|v buffer rows
    before ``qkv_ptr``'s) and the new token (which it also appends to the cache); returns them.
    ``kv0`` is the first chunk (``_kv_chunk``), ``nws`` the two halves of the q and of the k norm weight,
    already loaded (see _attention_tile)."""
    HALF: tl.constexpr = D // 2
    kb1, kb2, vb1, vb2, tok_mask = kv0
    d = tl.arange(0, HALF)
    q_src = qkv_ptr + heads[:, None] * D + d[None, :]
    q1 = tl.load(q_src, mask=g_mask, other=0.0, cache_modifier=".cg")
    q2 = tl.load(q_src + HALF, mask=g_mask, other=0.0, cache_modifier=".cg")
    dtype = q1.dtype
    k_src = qkv_ptr + HQ * D + kvh * D + d[None, :]
    v_src = qkv_ptr + (HQ + HKV) * D + kvh * D + d[None, :]
    k1 = tl.load(k_src, cache_modifier=".cg")
    k2 = tl.load(k_src + HALF, cache_modifier=".cg")
    v1 = tl.load(v_src, cache_modifier=".cg")
    v2 = tl.load(v_src + HALF, cache_modifier=".cg")
    q1, q2 = _norm_rope_heads(q1, q2, nws[0], nws[1], cos, sin, eps, D)
    k1, k2 = _norm_rope_heads(k1, k2, nws[2], nws[3], cos, sin, eps, D)
    if TRACE:
        qk = tl.sum(q1.to(tl.float32)) + tl.sum(k1.to(tl.float32))
        tl.store(trace_row + 6, tl.extra.cuda.globaltimer() + qk.to(tl.int64) * 0)

    # The last split appends this step's key and value at vLLM's slot (negative: a padding row, nothing
    # to store). No chunk reads it: they stop before ``pos``.
    keep = (d * 0 + tl.where(last, slot, -1))[None, :] >= 0
    at = (slot // PAGE) * stride_blk + (slot % PAGE) * stride_tok + kvh * stride_head + d[None, :]
    tl.store(k_cache + at, k1, mask=keep)
    tl.store(k_cache + at + HALF, k2, mask=keep)
    tl.store(v_cache + at, v1, mask=keep)
    tl.store(v_cache + at + HALF, v2, mask=keep)

    # Online softmax over the slice's cached tokens.
    for j in range(0, tl.cdiv(end - start, BLOCK_S)):
        nk1, nk2, nv1, nv2, n_mask = _kv_chunk(k_cache, v_cache, bt_ptr, j + 1, start, end, kvh, stride_blk,
                                               stride_tok, stride_head, D, PAGE, BLOCK_S)
        s = (_dot(q1, tl.trans(kb1), UPCAST) + _dot(q2, tl.trans(kb2), UPCAST)) * scale
        s = tl.where(tok_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc1 = acc1 * alpha[:, None] + _dot(p.to(dtype), vb1, UPCAST)
        acc2 = acc2 * alpha[:, None] + _dot(p.to(dtype), vb2, UPCAST)
        m_i = m_new
        kb1, kb2, vb1, vb2, tok_mask = nk1, nk2, nv1, nv2, n_mask
    if last:  # the request's earlier rows of this step, normed and rotated at their positions here
        NQKV: tl.constexpr = (HQ + 2 * HKV) * D
        for e in range(0, earlier):
            at_pos = pos - earlier + e
            e_cos = tl.load(cs_ptr + at_pos * D + d).to(tl.float32)[None, :]
            e_sin = tl.load(cs_ptr + at_pos * D + HALF + d).to(tl.float32)[None, :]
            e_src = k_src - (earlier - e) * NQKV
            ek1, ek2 = _norm_rope_heads(tl.load(e_src, cache_modifier=".cg"),
                                        tl.load(e_src + HALF, cache_modifier=".cg"),
                                        nws[2], nws[3], e_cos, e_sin, eps, D)
            ev_src = v_src - (earlier - e) * NQKV
            m_i, l_i, acc1, acc2 = _attend_token(q1, q2, ek1, ek2, tl.load(ev_src, cache_modifier=".cg"),
                                                 tl.load(ev_src + HALF, cache_modifier=".cg"), scale,
                                                 m_i, l_i, acc1, acc2)
    if last:  # the new token itself, from registers
        m_i, l_i, acc1, acc2 = _attend_token(q1, q2, k1, k2, v1, v2, scale, m_i, l_i, acc1, acc2)
    return m_i, l_i, acc1, acc2


@triton.jit
def _attend_token(q1, q2, k1, k2, v1, v2, scale, m_i, l_i, acc1, acc2):
    """One more key and value (each as two head-dim halves, [1, D / 2]) into the online softmax of the q
    heads ``q1``/``q2``."""
    s = (tl.sum(q1.to(tl.float32) * k1.to(tl.float32), axis=1)
         + tl.sum(q2.to(tl.float32) * k2.to(tl.float32), axis=1)) * scale
    m_new = tl.maximum(m_i, s)
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new)
    return (m_new, l_i * alpha + p, acc1 * alpha[:, None] + p[:, None] * v1.to(tl.float32),
            acc2 * alpha[:, None] + p[:, None] * v2.to(tl.float32))


@triton.jit
def _merge_parts(part_acc, part_ml, out_ptr, kvh, dtype, G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr):
    """out[kv head kvh's G q heads] = the softmax-weighted sum of their SPLITS parts (see
    _attention_tile). The parts were written by other workers: read through L2 (.cg), after the
    acquiring arrival. Rows are G rounded up to a power of two, not the attention's 16 (tl.dot's
    minimum): a [16, SPLITS, D] float32 load would take 32 · SPLITS registers per thread."""
    HALF: tl.constexpr = D // 2
    g = tl.arange(0, triton.next_power_of_2(G))
    ok = (g < G)[:, None]
    heads = kvh * G + g
    d = tl.arange(0, HALF)
    parts = heads[:, None] * SPLITS + tl.arange(0, SPLITS)[None, :]  # [G_P2, SPLITS]
    m = tl.load(part_ml + parts * 2, mask=ok, other=0.0, cache_modifier=".cg")
    w = tl.exp(m - tl.max(m, axis=1)[:, None])  # an empty slice has m = -inf: weight 0
    l = tl.sum(w * tl.load(part_ml + parts * 2 + 1, mask=ok, other=1.0, cache_modifier=".cg"), axis=1)
    at = parts[:, :, None] * D + d[None, None, :]
    acc1 = tl.sum(w[:, :, None] * tl.load(part_acc + at, mask=ok[:, :, None], other=0.0, cache_modifier=".cg"),
                  axis=1)
    acc2 = tl.sum(w[:, :, None] * tl.load(part_acc + at + HALF, mask=ok[:, :, None], other=0.0,
                                          cache_modifier=".cg"), axis=1)
    dst = out_ptr + heads[:, None] * D + d[None, :]
    tl.store(dst, (acc1 / l[:, None]).to(dtype), mask=ok)
    tl.store(dst + HALF, (acc2 / l[:, None]).to(dtype), mask=ok)


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

        O and DOWN chunks of 512 columns at batch 1 and 256 above it (512 there: 0.6B b8 +1.7%,
        1.7B b8 +7%)."""
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

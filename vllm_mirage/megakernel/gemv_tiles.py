"""The megakernel's GEMV tiles: a slice of output features of one weight matrix for every request of the
step, with the RMSNorm of the activation applied chunk by chunk (from its producers' per-tile sums of
squares), SiLU·mul as the gate/up epilogue, or the residual add and its sums of squares as the epilogue of
a task that finishes hidden features. QKV, O, GU, DOWN and LM tasks run one; NORM tasks the final norm of
one row. DOWN's products can also be split over the GU tasks (``_down_part``), summed in fixed point."""

import triton
import triton.language as tl

from vllm_mirage.megakernel.state import DOWN_FRACTION_BITS
from vllm_mirage.megakernel.sync import _wait
from vllm_mirage.ops._norm_gemv import _dot, _rms_scale, _silu_mul

_DOWN_SCALE = tl.constexpr(2.0**DOWN_FRACTION_BITS)  # see DecodeBuffers.down_acc
MAX_FUSED_DOWN_BATCH = 4  # _down_part unrolls its requests


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

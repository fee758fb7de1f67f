"""The persistent decode kernel: one launch runs a whole Qwen3 decode step from a task graph.

Each program is a worker with its own queue of tasks (see :mod:`vllm_mirage.megakernel.graph`). For
each task it spins on the counter of the stage it depends on (acquire), runs the tile, and bumps its
own stage's counter (release). The grid must not exceed what the GPU keeps resident at once (one
program per SM), or a waiting worker could hold the SM its producer needs.

The tiles are the fused ops' math at decode sizes: RMSNorm folded into GEMV tiles (the norm is
recomputed per tile from L2-resident activations), SiLU·mul as the gate/up epilogue, and one attention
task per (request, kv head) that normalises and rotates q/k, appends k/v to vLLM's paged cache and
attends over the cached tokens plus the new one (kept in registers, so no task reads what it just
stored). Weights are read through a per-layer pointer table: they stay vLLM's tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_mirage.megakernel.graph import TaskGraph
from vllm_mirage.megakernel.state import DecodeBatch, DecodeBuffers, DecodeWeights
from vllm_mirage.ops._dispatch import interpreted
from vllm_mirage.ops._norm_gemv import _dot, _rms_scale, _silu_mul


@triton.jit
def _load_summed(ptr, splits, split_stride, offs, mask):
    """Sum of a float32 split-K partial over its slots, in slot order (written by other workers: .cg)."""
    acc = tl.load(ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    for s in range(1, splits):
        acc += tl.load(ptr + s * split_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _norm_input(x_ptr, x_splits, res_ptr, offs, mask, B, K, dtype: tl.constexpr):
    """x + residual as the unfused path rounds it: the projection's output (float32 partials, summed)
    rounded to the activation dtype, plus the residual, rounded again."""
    x = _load_summed(x_ptr, x_splits, B * K, offs, mask).to(dtype).to(tl.float32)
    res = tl.load(res_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    return (x + res).to(dtype)


@triton.jit
def _gemv_tile(
    x_ptr, x_splits, res_ptr, nw_ptr, w_ptr, out_ptr, new_res_ptr, write_res,
    B, K, k_lo, k_hi, N, n0, eps,
    HAS_NORM: tl.constexpr, SILU_MUL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[:, n0:n0+BLOCK_N] = f(x) @ w[n0:n0+BLOCK_N, k_lo:k_hi].T for w [N(*2), K], out [B, N].

    With HAS_NORM, x is a float32 split-K partial [x_splits, B, K], f(x) = rmsnorm(sum(x) + res) over the
    whole K, the rounded sum is stored to new_res when write_res, and out is in the activation dtype
    (SILU_MUL: w holds gate rows then up rows, out = silu(gate) * up). Without, x is [B, K] in the
    activation dtype and out receives this K range's float32 partial sum.
    """
    dtype = w_ptr.dtype.element_ty
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * K
    for t0 in range(0, B, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < B
        rows = offs_t[:, None] * K
        if HAS_NORM:
            # A full-shape predicate (not a scalar `if`) keeps the loop branch-free.
            writer = t_mask & ((offs_t * 0 + write_res) != 0)
            sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs_k
                m = t_mask[:, None] & (k < K)[None, :]
                xv = _norm_input(x_ptr, x_splits, res_ptr, rows + k[None, :], m, B, K, dtype)
                tl.store(new_res_ptr + rows + k[None, :], xv, mask=writer[:, None] & (k < K)[None, :])
                xf = xv.to(tl.float32)
                sumsq += tl.sum(xf * xf, axis=1)
            rstd = tl.rsqrt(sumsq / K + eps)
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        if SILU_MUL:
            acc_up = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < k_hi
            m = t_mask[:, None] & k_mask[None, :]
            if HAS_NORM:
                a = _norm_input(x_ptr, x_splits, res_ptr, rows + k[None, :], m, B, K, dtype)
                nw = tl.load(nw_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
                a = _rms_scale(a, rstd[:, None], nw[None, :], dtype)
            else:
                a = tl.load(x_ptr + rows + k[None, :], mask=m, other=0.0, cache_modifier=".cg")
            wm = n_mask[:, None] & k_mask[None, :]
            acc += _dot(a, tl.trans(tl.load(w_rows + k[None, :], mask=wm, other=0.0)), UPCAST)
            if SILU_MUL:
                acc_up += _dot(a, tl.trans(tl.load(w_rows + N * K + k[None, :], mask=wm, other=0.0)), UPCAST)
        if SILU_MUL:
            y = _silu_mul(acc, acc_up, dtype)
        else:
            y = acc
        tl.store(out_ptr + offs_t[:, None] * N + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=t_mask[:, None] & n_mask[None, :])


@triton.jit
def _norm_row(x_ptr, x_splits, res_ptr, w_ptr, out_ptr, B, K, eps, BLOCK_K: tl.constexpr):
    """out = rmsnorm(sum(x) + res) * w for one row (x: float32 split-K partials), RMSNorm's rounding."""
    dtype = out_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_K)
    sumsq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        m = k0 + offs < K
        xv = _norm_input(x_ptr, x_splits, res_ptr, k0 + offs, m, B, K, dtype).to(tl.float32)
        sumsq += xv * xv
    rstd = tl.rsqrt(tl.sum(sumsq, axis=0) / K + eps)
    for k0 in range(0, K, BLOCK_K):
        m = k0 + offs < K
        xv = _norm_input(x_ptr, x_splits, res_ptr, k0 + offs, m, B, K, dtype)
        w = tl.load(w_ptr + k0 + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + k0 + offs, _rms_scale(xv, rstd, w, dtype), mask=m)


@triton.jit
def _norm_rope_heads(x1, x2, w_ptr, cos, sin, eps, D: tl.constexpr):
    """Per-row RMSNorm over the two halves of a head, then neox rotary; rounded like qk_norm_rope."""
    dtype = x1.dtype
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, HALF)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / D + eps)[:, None]
    n1 = _rms_scale(x1f, rstd, tl.load(w_ptr + d).to(tl.float32)[None, :], dtype).to(tl.float32)
    n2 = _rms_scale(x2f, rstd, tl.load(w_ptr + HALF + d).to(tl.float32)[None, :], dtype).to(tl.float32)
    return (n1 * cos - n2 * sin).to(dtype), (n2 * cos + n1 * sin).to(dtype)


@triton.jit
def _attention_tile(
    qkv_ptr, out_ptr, qw_ptr, kw_ptr, k_cache, v_cache, bt_ptr, pos, slot, cs_ptr, kvh, eps, scale,
    stride_blk, stride_tok, stride_head,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One request, one kv head: q/k norm + rotary, store k/v at ``slot``, attend over [0, pos]."""
    G: tl.constexpr = HQ // HKV
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, HALF)
    g = tl.arange(0, BLOCK_G)
    g_mask = (g < G)[:, None]
    heads = kvh * G + g
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
    cos = tl.load(cs_ptr + pos * D + d).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * D + HALF + d).to(tl.float32)[None, :]
    q1, q2 = _norm_rope_heads(q1, q2, qw_ptr, cos, sin, eps, D)
    k1, k2 = _norm_rope_heads(k1, k2, kw_ptr, cos, sin, eps, D)

    # Append this step's key and value at vLLM's slot (negative: a padding row, nothing to store).
    keep = (d * 0 + slot)[None, :] >= 0
    at = (slot // BLOCK_S) * stride_blk + (slot % BLOCK_S) * stride_tok + kvh * stride_head + d[None, :]
    tl.store(k_cache + at, k1, mask=keep)
    tl.store(k_cache + at + HALF, k2, mask=keep)
    tl.store(v_cache + at, v1, mask=keep)
    tl.store(v_cache + at + HALF, v2, mask=keep)

    # Online softmax over the cached tokens [0, pos), block by block.
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_G, HALF], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_G, HALF], dtype=tl.float32)
    s_off = tl.arange(0, BLOCK_S)
    for j in range(0, tl.cdiv(pos, BLOCK_S)):
        base = tl.load(bt_ptr + j).to(tl.int64) * stride_blk + kvh * stride_head
        tok_mask = (j * BLOCK_S + s_off) < pos
        rows = base + s_off[:, None] * stride_tok + d[None, :]
        kb1 = tl.load(k_cache + rows, mask=tok_mask[:, None], other=0.0)
        kb2 = tl.load(k_cache + rows + HALF, mask=tok_mask[:, None], other=0.0)
        s = (_dot(q1, tl.trans(kb1), UPCAST) + _dot(q2, tl.trans(kb2), UPCAST)) * scale
        s = tl.where(tok_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vb1 = tl.load(v_cache + rows, mask=tok_mask[:, None], other=0.0)
        vb2 = tl.load(v_cache + rows + HALF, mask=tok_mask[:, None], other=0.0)
        acc1 = acc1 * alpha[:, None] + _dot(p.to(dtype), vb1, UPCAST)
        acc2 = acc2 * alpha[:, None] + _dot(p.to(dtype), vb2, UPCAST)
        m_i = m_new
    # The new token itself, from registers.
    s_new = (tl.sum(q1.to(tl.float32) * k1.to(tl.float32), axis=1)
             + tl.sum(q2.to(tl.float32) * k2.to(tl.float32), axis=1)) * scale
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp(m_i - m_new)
    p_new = tl.exp(s_new - m_new)
    l_i = l_i * alpha + p_new
    acc1 = acc1 * alpha[:, None] + p_new[:, None] * v1.to(tl.float32)
    acc2 = acc2 * alpha[:, None] + p_new[:, None] * v2.to(tl.float32)
    dst = out_ptr + heads[:, None] * D + d[None, :]
    tl.store(dst, (acc1 / l_i[:, None]).to(dtype), mask=g_mask)
    tl.store(dst + HALF, (acc2 / l_i[:, None]).to(dtype), mask=g_mask)


@triton.jit
def _decode_step_kernel(
    tasks, queue, queue_offsets, counters,
    wtab, kvtab, final_norm, lm_head, cos_sin, positions, slot_mapping, block_tables, stride_bt,
    x_buf, res_mlp, res_attn, qkv_buf, attn_buf, o_buf, act_buf, final_out,
    B, H, I, V, SO, SD, eps, scale, stride_blk, stride_tok, stride_head,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_LM: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    dtype = qkv_buf.dtype.element_ty
    ptr = tl.pointer_type(dtype)
    NQKV: tl.constexpr = (HQ + 2 * HKV) * D
    NQ: tl.constexpr = HQ * D
    BH = B * H
    worker = tl.program_id(0)
    for qi in range(tl.load(queue_offsets + worker), tl.load(queue_offsets + worker + 1)):
        row = tasks + tl.load(queue + qi) * 6
        kind = tl.load(row)
        layer = tl.load(row + 1)
        index = tl.load(row + 2)
        wait_stage = tl.load(row + 3)
        if wait_stage >= 0:
            wait_count = tl.load(row + 4)
            while tl.atomic_add(counters + wait_stage, 0, sem="acquire") < wait_count:
                pass
        tl.debug_barrier()
        w = wtab + layer * 8  # columns: DecodeWeights.TABLE
        if kind == 0:  # QKV: norm(x + residual) from the previous layer's down_proj partials
            _gemv_tile(x_buf + layer * SD * BH, SD, res_mlp + layer * BH, tl.load(w).to(ptr), tl.load(w + 1).to(ptr),
                       qkv_buf + layer * B * NQKV, res_attn + layer * BH, (index == 0).to(tl.int32),
                       B, H, 0, H, NQKV, index * BLOCK_N, eps, True, False, UPCAST, BLOCK_T, BLOCK_N, BLOCK_K)
        elif kind == 1:  # ATTN
            b = index // HKV
            _attention_tile(qkv_buf + (layer * B + b) * NQKV, attn_buf + (layer * B + b) * NQ,
                            tl.load(w + 2).to(ptr), tl.load(w + 3).to(ptr),
                            tl.load(kvtab + layer * 2).to(ptr), tl.load(kvtab + layer * 2 + 1).to(ptr),
                            block_tables + b * stride_bt, tl.load(positions + b), tl.load(slot_mapping + b).to(tl.int64),
                            cos_sin, index % HKV, eps, scale,
                            stride_blk, stride_tok, stride_head, HQ, HKV, D, BLOCK_G, BLOCK_S, UPCAST)
        elif kind == 2:  # O: one (feature tile, K range) of o_proj into its partial-sum slot
            split = index % SO
            k_len = tl.cdiv(NQ, SO)
            _gemv_tile(attn_buf + layer * B * NQ, 1, attn_buf, attn_buf, tl.load(w + 4).to(ptr),
                       o_buf + (layer * SO + split) * BH, attn_buf, 0,
                       B, NQ, split * k_len, tl.minimum(NQ, (split + 1) * k_len), H, (index // SO) * BLOCK_N, eps,
                       False, False, UPCAST, BLOCK_T, BLOCK_N, BLOCK_K)
        elif kind == 3:  # GU: norm(o + residual), o from its partials
            _gemv_tile(o_buf + layer * SO * BH, SO, res_attn + layer * BH, tl.load(w + 5).to(ptr),
                       tl.load(w + 6).to(ptr), act_buf + layer * B * I, res_mlp + (layer + 1) * BH,
                       (index == 0).to(tl.int32), B, H, 0, H, I, index * BLOCK_N, eps, True, True, UPCAST,
                       BLOCK_T, BLOCK_N, BLOCK_K)
        elif kind == 4:  # DOWN: one (feature tile, K range) of down_proj into its partial-sum slot
            split = index % SD
            k_len = tl.cdiv(I, SD)
            _gemv_tile(act_buf + layer * B * I, 1, act_buf, act_buf, tl.load(w + 7).to(ptr),
                       x_buf + ((layer + 1) * SD + split) * BH, act_buf, 0,
                       B, I, split * k_len, tl.minimum(I, (split + 1) * k_len), H, (index // SD) * BLOCK_N, eps,
                       False, False, UPCAST, BLOCK_T, BLOCK_N, BLOCK_K)
        elif kind == 5:  # LM: final norm + lm_head slice into the logits; `layer` is the last layer
            _gemv_tile(x_buf + (layer + 1) * SD * BH, SD, res_mlp + (layer + 1) * BH, final_norm, lm_head,
                       final_out, final_out, index * 0, B, H, 0, H, V, index * BLOCK_N_LM, eps, True, False, UPCAST,
                       BLOCK_T, BLOCK_N_LM, BLOCK_K)
        else:  # NORM: final norm of request `index`, for vLLM's own lm_head
            _norm_row(x_buf + (layer + 1) * SD * BH + index * H, SD, res_mlp + (layer + 1) * BH + index * H,
                      final_norm, final_out + index * H, B, H, eps, BLOCK_K)
        tl.debug_barrier()
        tl.atomic_add(counters + tl.load(row + 5), 1, sem="release")


def check_supported(graph: TaskGraph, weights: DecodeWeights, batch: DecodeBatch, buffers: DecodeBuffers) -> None:
    """Raise ValueError for what this kernel does not handle (callers fall back to the fused path)."""
    s = graph.shape
    if buffers.qkv.is_cuda:
        sms = torch.cuda.get_device_properties(buffers.qkv.device).multi_processor_count
        if graph.num_workers > sms:
            # More workers than SMs can leave a producer unscheduled behind spinning consumers: a hang.
            raise ValueError(f"megakernel: {graph.num_workers} workers for {sms} SMs could deadlock")
    if s.head_dim & (s.head_dim - 1) or s.head_dim < 32:
        raise ValueError(f"megakernel: head_dim {s.head_dim} must be a power of two ≥ 32")
    bs = batch.block_size
    if bs & (bs - 1) or bs < 16:
        raise ValueError(f"megakernel: KV-cache block size {bs} must be a power of two ≥ 16")
    if s.num_heads % s.num_kv_heads:
        raise ValueError("megakernel: query heads must be a multiple of kv heads")
    want = (s.num_kv_heads, s.head_dim)
    for cache in batch.k_caches + batch.v_caches:
        if cache.shape[2:] != want or cache.stride() != batch.k_caches[0].stride() or cache.stride(-1) != 1:
            raise ValueError(f"megakernel: KV caches must be [blocks, block_size, {want[0]}, {want[1]}] views "
                             "with one set of strides and a unit head-dim stride")
    if not (batch.positions.shape[0] == batch.slot_mapping.shape[0] == buffers.qkv.shape[1] == s.batch):
        raise ValueError("megakernel: batch size differs between graph, batch and buffers")
    if not weights.cos_sin_cache.is_contiguous():
        raise ValueError("megakernel: cos_sin_cache must be contiguous")
    for t in (weights.lm_head, weights.final_norm):
        if not t.is_contiguous():
            raise ValueError("megakernel: final norm and lm_head must be contiguous")


def kv_pointer_table(batch: DecodeBatch) -> torch.Tensor:
    """int64 [L, 2]: each layer's key and value cache base pointers."""
    rows = [[k.data_ptr(), v.data_ptr()] for k, v in zip(batch.k_caches, batch.v_caches)]
    return torch.tensor(rows, dtype=torch.int64, device=batch.k_caches[0].device)


def decode_step(graph: TaskGraph, weights: DecodeWeights, batch: DecodeBatch, buffers: DecodeBuffers,
                wtab: torch.Tensor | None = None, kvtab: torch.Tensor | None = None) -> torch.Tensor:
    """Run one decode step with ``graph.num_workers`` persistent programs; returns ``buffers.logits``
    (or ``buffers.hidden_out`` for a graph built without the lm_head).

    ``buffers.load_input`` must have received the embedded tokens. ``wtab``/``kvtab`` (pointer tables) may be built once
    and passed in: they change only when the weights or caches move.
    """
    check_supported(graph, weights, batch, buffers)
    s = graph.shape
    if wtab is None:
        wtab = weights.pointer_table()
    if kvtab is None:
        kvtab = kv_pointer_table(batch)
    cache = batch.k_caches[0]
    out = buffers.logits if s.lm_head else buffers.hidden_out
    buffers.counters.zero_()
    _decode_step_kernel[(graph.num_workers,)](
        graph.tasks, graph.queue, graph.queue_offsets, buffers.counters,
        wtab, kvtab, weights.final_norm, weights.lm_head, weights.cos_sin_cache, batch.positions,
        batch.slot_mapping, batch.block_tables, batch.block_tables.stride(0),
        buffers.x, buffers.res_mlp, buffers.res_attn, buffers.qkv, buffers.attn, buffers.o, buffers.act, out,
        s.batch, s.hidden, s.intermediate, s.vocab, s.split_o, max(1, s.split_down), weights.eps, s.head_dim ** -0.5,
        cache.stride(0), cache.stride(1), cache.stride(2),
        HQ=s.num_heads, HKV=s.num_kv_heads, D=s.head_dim, BLOCK_S=batch.block_size,
        BLOCK_G=max(16, triton.next_power_of_2(s.num_heads // s.num_kv_heads)),
        BLOCK_T=16, BLOCK_N=s.block_n, BLOCK_N_LM=s.block_n_lm, BLOCK_K=min(128, triton.next_power_of_2(s.hidden)),
        UPCAST=interpreted() or buffers.qkv.dtype == torch.float32,
        num_warps=4,
    )
    return out

"""The megakernel's attention task: one (request, kv head, context split) of a decode step. It normalises
and rotates q and k, appends k/v to vLLM's paged cache, attends over its share of the cached tokens (the
last split also over the new token, kept in registers, and over the request's earlier rows of the step),
and the split of a head that arrives last merges the parts."""

import triton
import triton.language as tl

from vllm_mirage.megakernel.sync import _wait
from vllm_mirage.ops._norm_gemv import _dot, _rms_scale

# Cached tokens per step of an attention task's loop (at least one KV-cache block). The next chunk's
# keys and values wait in registers while this one is used; at 64 tokens that is 128 registers per
# thread in a kernel already at the 255 cap, and 16 context splits ran 5% slower than 4 at 128 cached
# tokens on Qwen3-0.6B (docs/design.md). At 32 they cost the same.
ATTN_CHUNK = 32


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


@triton.jit(noinline=True)  # a device function of its own, as the GEMV tiles (gemv_tiles.py)
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

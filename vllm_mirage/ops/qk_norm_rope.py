"""Qwen3's per-head q/k RMSNorm and the neox rotary embedding, in one pass over q and k.

Stock vLLM runs q_norm, k_norm and the rotary kernel separately, each reading and writing q and k.
Here one program loads one head of one token, normalises it over the head dim, rotates it with the
position's cos/sin from vLLM's ``cos_sin_cache`` (``[max_pos, D]``: cos half, then sin half) and
stores it: q and k cross memory once each way. A head dim that is not a power of two (e.g. 96) runs
over the next power-of-two block of each half with masked loads and stores.
"""

import torch
import triton
import triton.language as tl

from vllm_mirage.ops import reference
from vllm_mirage.ops._dispatch import record, register_op, use_triton


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, pos_ptr, cache_ptr, q_out_ptr, k_out_ptr,
    stride_q, stride_k, stride_cache, eps,
    HQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, BLOCK_HALF)
    m = d < HALF  # masked lanes load 0, which adds nothing to the sum of squares
    # Heads [0, HQ) are q heads, the rest k heads: one launch covers both.
    if head < HQ:
        src = q_ptr + token * stride_q + head * D
        dst = q_out_ptr + token * (HQ * D) + head * D
        w_ptr = qw_ptr
    else:
        hk = head - HQ
        src = k_ptr + token * stride_k + hk * D
        dst = k_out_ptr + token * (tl.num_programs(1) - HQ) * D + hk * D
        w_ptr = kw_ptr
    x1 = tl.load(src + d, mask=m, other=0.0)
    x2 = tl.load(src + HALF + d, mask=m, other=0.0)
    dtype = x1.dtype
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1f * x1f, axis=0) + tl.sum(x2f * x2f, axis=0)) / D + eps)
    # RMSNorm's rounding points: normalise in fp32, round, scale by the weight, round.
    n1 = ((x1f * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + d, mask=m).to(tl.float32)).to(dtype).to(tl.float32)
    n2 = ((x2f * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + HALF + d, mask=m).to(tl.float32)).to(dtype).to(tl.float32)
    pos = tl.load(pos_ptr + token)
    cos = tl.load(cache_ptr + pos * stride_cache + d, mask=m).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + d, mask=m).to(tl.float32)
    tl.store(dst + d, (n1 * cos - n2 * sin).to(dtype), mask=m)
    tl.store(dst + HALF + d, (n2 * cos + n1 * sin).to(dtype), mask=m)


def qk_norm_rope_triton(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps, q_out=None, k_out=None):
    """Launcher; ``q_out``/``k_out`` may be given (tests poison them to catch unwritten elements)."""
    D = q_norm_weight.shape[0]
    T = q.shape[0]
    hq, hk = q.shape[1] // D, k.shape[1] // D
    assert q.stride(1) == 1 and k.stride(1) == 1 and D % 2 == 0
    q_out = q.new_empty(q.shape) if q_out is None else q_out
    k_out = k.new_empty(k.shape) if k_out is None else k_out
    if T > 0:
        _qk_norm_rope_kernel[(T, hq + hk)](
            q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, q_out, k_out,
            q.stride(0), k.stride(0), cos_sin_cache.stride(0), eps,
            HQ=hq, D=D, BLOCK_HALF=triton.next_power_of_2(D // 2), num_warps=1,
        )
    return q_out, k_out


def _fake(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@register_op("qk_norm_rope", _fake)
def _op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    triton_ok = use_triton(q)
    record("qk_norm_rope", triton_ok)
    if not triton_ok:
        return reference.qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps)
    return qk_norm_rope_triton(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps)


def qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps):
    """``q``: ``[T, Hq*D]``, ``k``: ``[T, Hkv*D]`` (row-strided views of the fused qkv output are fine),
    ``positions``: ``[T]``. Returns new contiguous ``(q, k)``; the inputs are not modified."""
    return _op(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps)

"""The decode-shaped matmul shared by the norm+linear ops: RMSNorm prologue, GEMV-style tiles, optional
SiLU-and-mul epilogue.

At decode sizes (a few tokens) a linear layer is a weight stream: every weight byte is read once and
used for only ``T`` multiply-adds, so the kernel's job is to keep HBM busy. Each program owns a
``BLOCK_N`` slice of output features for a ``BLOCK_T`` block of tokens and streams the matching weight
rows in ``BLOCK_K`` chunks. The activations are tiny and L2-resident, so each program first re-reads
them to compute the per-token RMS (the Mirage trick: recompute instead of a second launch), then
normalises each chunk in registers just before the dot: normalised activations never reach memory.

``tl.dot`` needs at least 16 rows; padding T up to 16 costs tensor-core cycles we have to spare.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vllm_mirage.ops._dispatch import interpreted
from vllm_mirage.ops.add_rms_norm import rms_norm_triton

# Up to this many tokens the fused GEMV kernel runs; above it, the norm kernel then cuBLAS. Chosen from
# benchmarks/bench_ops.py on an H100 (see benchmarks/NOTES.md): at T=64 cuBLAS's tiled GEMM wins.
GEMV_MAX_TOKENS = 16


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # Triton's interpreter computes bf16 dots wrongly, and fp32 must not silently drop to tf32.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _norm_gemv_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, out_ptr, new_res_ptr,
    T, H, N, eps,
    stride_x, stride_res, stride_w, stride_out,
    HAS_NORM: tl.constexpr,
    HAS_RES: tl.constexpr,
    SILU_MUL: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    t_mask = offs_t < T
    n_mask = offs_n < N
    x_rows = x_ptr + offs_t[:, None].to(tl.int64) * stride_x
    res_rows = res_ptr + offs_t[:, None].to(tl.int64) * stride_res
    dtype = out_ptr.dtype.element_ty

    if HAS_NORM:
        sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + offs_k
            m = t_mask[:, None] & (k < H)[None, :]
            xv = tl.load(x_rows + k[None, :], mask=m, other=0.0)
            if HAS_RES:
                # The residual stream is stored in the activation dtype: normalise the rounded sum.
                xv = (xv.to(tl.float32) + tl.load(res_rows + k[None, :], mask=m, other=0.0).to(tl.float32)).to(dtype)
                if pid_n == 0:
                    tl.store(new_res_ptr + offs_t[:, None].to(tl.int64) * stride_x + k[None, :], xv, mask=m)
            xf = xv.to(tl.float32)
            sumsq += tl.sum(xf * xf, axis=1)
        rstd = tl.rsqrt(sumsq / H + eps)

    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    if SILU_MUL:
        acc_up = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < H
        m = t_mask[:, None] & k_mask[None, :]
        a = tl.load(x_rows + k[None, :], mask=m, other=0.0)
        if HAS_NORM:
            if HAS_RES:
                a = (a.to(tl.float32) + tl.load(res_rows + k[None, :], mask=m, other=0.0).to(tl.float32)).to(dtype)
            nw = tl.load(nw_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            # Same rounding points as RMSNorm: normalise in fp32, round, scale by the weight, round.
            a = ((a.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32) * nw[None, :]).to(dtype)
        wm = n_mask[:, None] & k_mask[None, :]
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + k[None, :]
        acc += _dot(a, tl.trans(tl.load(w_rows, mask=wm, other=0.0)), UPCAST)
        if SILU_MUL:
            # vLLM's merged gate_up weight: gate rows [0, N), up rows [N, 2N).
            acc_up += _dot(a, tl.trans(tl.load(w_rows + N * stride_w, mask=wm, other=0.0)), UPCAST)

    if SILU_MUL:
        gate = acc.to(dtype).to(tl.float32)
        y = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)
    else:
        y = acc
    out = out_ptr + offs_t[:, None].to(tl.int64) * stride_out + offs_n[None, :]
    tl.store(out, y.to(dtype), mask=t_mask[:, None] & n_mask[None, :])


def default_config(T: int, H: int, N: int) -> dict:
    """Block sizes by shape. No run-time autotuning: vLLM captures CUDA graphs, and a first call inside
    a capture must not benchmark. See benchmarks/NOTES.md for the sweep behind these numbers."""
    return {
        "BLOCK_T": 16,
        "BLOCK_N": 16 if N <= 8192 else 32,
        "BLOCK_K": min(256, max(16, triton.next_power_of_2(H))),
        "num_warps": 4,
        "num_stages": 4,
    }


def norm_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    silu_mul: bool = False,
    out: torch.Tensor | None = None,
    new_residual: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused kernel for any T. Returns ``(out, new_residual or None)``.

    ``out``/``new_residual`` may be passed in (tests poison them); ``config`` overrides the block sizes.
    """
    x = x.contiguous()
    T, H = x.shape
    N = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    assert weight.shape[1] == H and weight.stride(1) == 1, "weight must be [N, H] with unit column stride"
    out = x.new_empty((T, N)) if out is None else out
    has_res = residual is not None
    if has_res:
        residual = residual.contiguous()
        new_residual = torch.empty_like(x) if new_residual is None else new_residual
    cfg = {**default_config(T, H, N), **(config or {})}
    block_t = cfg.pop("BLOCK_T")
    if T > 0:
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(T, block_t))
        _norm_gemv_kernel[grid](
            x, residual if has_res else x, norm_weight if norm_weight is not None else weight,
            weight, out, new_residual if has_res else out,
            T, H, N, eps,
            x.stride(0), residual.stride(0) if has_res else 0, weight.stride(0), out.stride(0),
            HAS_NORM=norm_weight is not None,
            HAS_RES=has_res,
            SILU_MUL=silu_mul,
            UPCAST=interpreted() or x.dtype == torch.float32,
            BLOCK_T=block_t,
            **cfg,
        )
    return out, new_residual


def norm_then_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    silu_mul: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unfused path for prefill-sized T: our norm kernel, then cuBLAS (a tiled GEMM wins there)."""
    new_residual = None
    if norm_weight is not None:
        x, new_residual = rms_norm_triton(x, norm_weight, eps, residual=residual)
    y = F.linear(x, weight)
    if silu_mul:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y, new_residual


def fused_or_unfused(x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.shape[0] <= GEMV_MAX_TOKENS:
        return norm_gemv(x, *args, **kwargs)
    return norm_then_linear(x, *args, **kwargs)

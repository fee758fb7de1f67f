"""RMSNorm with an optional residual add, one program per token row.

``add_rms_norm(x, residual, w, eps) -> (rmsnorm(x + residual) * w, x + residual)``. Besides being an op of
its own, it is the norm half of the unfused (prefill) path of the norm+GEMM ops.
"""

import torch
import triton
import triton.language as tl

from vllm_mirage.ops import reference
from vllm_mirage.ops._dispatch import record, register_op, use_triton


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    H, eps,
    stride_x, stride_res, stride_out, stride_new_res,
    HAS_RES: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        # Round the sum to the activation dtype before normalising: the residual stream is stored
        # in that dtype, and the reference (and vLLM) normalise the stored value.
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)).to(
            x.dtype
        )
        tl.store(new_res_ptr + row * stride_new_res + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(x.dtype), mask=mask)


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    new_residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launcher; ``out``/``new_residual`` may be given (tests poison them to catch unwritten elements)."""
    T, H = x.shape
    out = torch.empty_like(x) if out is None else out
    if residual is not None and new_residual is None:
        new_residual = torch.empty_like(x)
    if T > 0:
        _rms_norm_kernel[(T,)](
            x, residual if residual is not None else x, weight, out,
            new_residual if new_residual is not None else out,
            H, eps,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            new_residual.stride(0) if new_residual is not None else 0,
            HAS_RES=residual is not None,
            BLOCK_H=triton.next_power_of_2(H),
            num_warps=4 if H <= 2048 else 8,
        )
    return out, new_residual


def _add_rms_norm_fake(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@register_op("add_rms_norm", _add_rms_norm_fake)
def _add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    triton_ok = use_triton(x)
    record("add_rms_norm", triton_ok)
    if not triton_ok:
        return reference.add_rms_norm(x, residual, weight, eps)
    return rms_norm_triton(x, weight, eps, residual=residual)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rmsnorm(x + residual) * weight, x + residual)`` for ``x``, ``residual`` of shape ``[T, H]``."""
    return _add_rms_norm_op(x, residual, weight, eps)

"""Plain PyTorch references for every fused op, with the same signatures as the Triton versions.

They define the semantics the kernels are tested against, and they are what the fused modules
run where no Triton kernel can (CPU without Triton's interpreter). Math is done in float32 and
cast back to the input dtype at the same points vLLM's own RMSNorm and rotary code do, so that
on float32 inputs they match stock vLLM to rounding.
"""

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rmsnorm(x + residual) * weight, x + residual)``."""
    new_residual = x + residual
    return _rms_norm(new_residual, weight, eps), new_residual


def rms_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
):
    """``rmsnorm(x) @ weight.T``; with ``residual``, ``(rmsnorm(x + residual) @ weight.T, x + residual)``.

    ``weight`` is ``[N, H]`` (vLLM's layout), ``x`` and ``residual`` are ``[T, H]``.
    """
    if residual is None:
        return F.linear(_rms_norm(x, norm_weight, eps), weight)
    normed, new_residual = add_rms_norm(x, residual, norm_weight, eps)
    return F.linear(normed, weight), new_residual


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` where ``weight`` is vLLM's merged ``[gate; up]``, ``[2I, H]``."""
    gate, up = F.linear(x, weight).chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm_linear_silu_mul(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
):
    """``linear_silu_mul(rmsnorm(x), weight)``, with the same residual convention as ``rms_norm_linear``."""
    if residual is None:
        return linear_silu_mul(_rms_norm(x, norm_weight, eps), weight)
    normed, new_residual = add_rms_norm(x, residual, norm_weight, eps)
    return linear_silu_mul(normed, weight), new_residual


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm over the head dim D, then neox-style rotary embedding.

    ``q`` is ``[T, Hq*D]``, ``k`` is ``[T, Hkv*D]`` (row-strided views are fine), ``positions`` is
    ``[T]`` and ``cos_sin_cache`` is vLLM's ``[max_pos, D]`` table (cos in the first half, sin in the
    second). Returns new contiguous ``(q, k)`` of the input shapes.
    """
    d = q_norm_weight.shape[0]
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # [T, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]

    def one(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        heads = _rms_norm(x.reshape(x.shape[0], -1, d), w, eps).float()
        x1, x2 = heads.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return rotated.to(x.dtype).reshape(x.shape[0], -1)

    return one(q, q_norm_weight), one(k, k_norm_weight)

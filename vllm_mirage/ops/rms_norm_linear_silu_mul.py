"""RMSNorm (+ residual add) → merged gate_up linear → SiLU-and-mul, in one kernel.

Returns ``silu(n @ gate.T) * (n @ up.T)`` for ``n = rmsnorm(x [+ residual])``, and with ``residual`` also
``x + residual``. In the fused kernel neither the normalised activations nor the ``[T, 2I]`` gate/up
tensor reach memory: each program owns matching rows of gate and up and applies the activation in its
epilogue. Two fused kernels run where they measured faster (``_linear_paths.linear_path``): the whole-row
GEMV at T <= 2, the chunked one at T <= 8 and H <= 1024; elsewhere our norm kernel, cuBLAS and a
one-pass SiLU-mul kernel.
"""

import torch

from vllm_mirage.ops import reference
from vllm_mirage.ops._dispatch import record, register_op, use_triton
from vllm_mirage.ops._linear_paths import fused_or_unfused

_NAME = "rms_norm_linear_silu_mul"


def _fake(x, norm_weight, weight, eps):
    return x.new_empty((x.shape[0], weight.shape[0] // 2))


@register_op("rms_norm_linear_silu_mul", _fake)
def _op(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    triton_ok = use_triton(x)
    record(_NAME, triton_ok)
    if not triton_ok:
        return reference.rms_norm_linear_silu_mul(x, norm_weight, weight, eps)
    return fused_or_unfused(x, weight, norm_weight, eps, silu_mul=True)[0]


def _add_fake(x, residual, norm_weight, weight, eps):
    return _fake(x, norm_weight, weight, eps), torch.empty_like(x)


@register_op("add_rms_norm_linear_silu_mul", _add_fake)
def _add_op(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    triton_ok = use_triton(x)
    record(_NAME, triton_ok)
    if not triton_ok:
        return reference.rms_norm_linear_silu_mul(x, norm_weight, weight, eps, residual=residual)
    return fused_or_unfused(x, weight, norm_weight, eps, residual=residual, silu_mul=True)


def rms_norm_linear_silu_mul(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
):
    """``weight`` is vLLM's merged ``[gate; up]`` of shape ``[2I, H]``; returns ``[T, I]`` (and the residual)."""
    if residual is None:
        return _op(x, norm_weight, weight, eps)
    return _add_op(x, residual, norm_weight, weight, eps)

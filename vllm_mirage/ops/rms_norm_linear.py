"""RMSNorm (+ residual add) fused into the following linear layer: Mirage's RMSNorm+QKV fusion.

``rms_norm_linear(x, norm_weight, weight, eps)`` = ``rmsnorm(x) @ weight.T``; with ``residual`` it returns
``(rmsnorm(x + residual) @ weight.T, x + residual)``. The normalised activations never reach memory. At
T <= 2 (decode at batch 1-2) the whole-row GEMV (``_row_gemv.py``) runs it, 1.08-1.22x of norm kernel +
cuBLAS on Qwen3 QKV shapes; at larger T the shape rule (``_linear_paths.linear_path``) sends it to that
unfused pair, which beat both fused kernels there. See docs/design.md.
"""

import torch

from vllm_mirage.ops import reference
from vllm_mirage.ops._dispatch import record, register_op, use_triton
from vllm_mirage.ops._linear_paths import fused_or_unfused

_NAME = "rms_norm_linear"


def _fake(x, norm_weight, weight, eps):
    return x.new_empty((x.shape[0], weight.shape[0]))


@register_op("rms_norm_linear", _fake)
def _rms_norm_linear_op(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    triton_ok = use_triton(x)
    record(_NAME, triton_ok)
    if not triton_ok:
        return reference.rms_norm_linear(x, norm_weight, weight, eps)
    return fused_or_unfused(x, weight, norm_weight, eps)[0]


def _add_fake(x, residual, norm_weight, weight, eps):
    return _fake(x, norm_weight, weight, eps), torch.empty_like(x)


@register_op("add_rms_norm_linear", _add_fake)
def _add_rms_norm_linear_op(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    triton_ok = use_triton(x)
    record(_NAME, triton_ok)
    if not triton_ok:
        return reference.rms_norm_linear(x, norm_weight, weight, eps, residual=residual)
    return fused_or_unfused(x, weight, norm_weight, eps, residual=residual)


def rms_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
):
    """``x``, ``residual``: ``[T, H]``; ``norm_weight``: ``[H]``; ``weight``: ``[N, H]`` (vLLM's layout)."""
    if residual is None:
        return _rms_norm_linear_op(x, norm_weight, weight, eps)
    return _add_rms_norm_linear_op(x, residual, norm_weight, weight, eps)

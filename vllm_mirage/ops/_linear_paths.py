"""The shape rule: which kernel a (norm +) linear (+ SiLU·mul) op runs for a given number of tokens.

Three paths:

- ``ROW``: the whole-row GEMV (``_row_gemv.py``), norm computed once per program.
- ``CHUNKED``: the chunked tensor-core GEMV (``_norm_gemv.py``), RMS pre-pass per 32-row tile.
- ``UNFUSED``: our (add +) RMSNorm kernel, then cuBLAS, then (MLP) our SiLU·mul kernel.

Which one wins depends on the GPU: the model registers the ``DecodePlan`` measured for its GPU and shape
(``vllm_mirage.tuning``) before its first step, keyed by hidden size. The choice is a table lookup, never a
measurement, so it is safe inside a CUDA-graph capture. Without a registered plan (kernel tests, benchmarks)
the H100-measured rule of ``tuning.plan.default_linear_path`` applies.
"""

import torch
import torch.nn.functional as F

from vllm_mirage.ops._norm_gemv import norm_gemv, silu_mul_triton
from vllm_mirage.ops._row_gemv import fits, row_gemv
from vllm_mirage.ops.add_rms_norm import rms_norm_triton
from vllm_mirage.tuning.plan import CHUNKED, ROW, UNFUSED, DecodePlan, default_linear_path

_PLANS: dict[int, DecodePlan] = {}


def register_plan(hidden: int, plan: DecodePlan) -> None:
    """Use ``plan`` for every op whose activations have ``hidden`` columns, in this process."""
    _PLANS[hidden] = plan


def op_kind(has_norm: bool, silu_mul: bool) -> str:
    return ("norm_silu" if silu_mul else "norm") if has_norm else "silu"


def linear_path(T: int, H: int, has_norm: bool, silu_mul: bool) -> str:
    kind = op_kind(has_norm, silu_mul)
    plan = _PLANS.get(H)
    if plan is None:
        return default_linear_path(kind, T, H, row_fits=fits(T, H))
    path = plan.linear_path(kind, T)
    # A plan picks ROW only where it measured it, i.e. where it fits; anything else is stock's work.
    return UNFUSED if path == ROW and not fits(T, H) else path


def norm_then_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    silu_mul: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``UNFUSED``: our norm kernel, then cuBLAS (a tiled GEMM at prefill sizes), then SiLU·mul."""
    new_residual = None
    if norm_weight is not None:
        x, new_residual = rms_norm_triton(x, norm_weight, eps, residual=residual)
    y = F.linear(x, weight)
    if silu_mul:
        y = silu_mul_triton(y)
    return y, new_residual


_KERNELS = {ROW: row_gemv, CHUNKED: norm_gemv, UNFUSED: norm_then_linear}


def fused_or_unfused(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    silu_mul: bool = False,
    path: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the op on ``path``, by default the one ``linear_path`` picks. Returns ``(out, new_residual or None)``."""
    path = path or linear_path(x.shape[0], x.shape[1], norm_weight is not None, silu_mul)
    return _KERNELS[path](x, weight, norm_weight, eps, residual=residual, silu_mul=silu_mul)

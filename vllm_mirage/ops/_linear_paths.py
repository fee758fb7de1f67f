"""The shape rule: which kernel a (norm +) linear (+ SiLU·mul) op runs for a given number of tokens.

Three paths, each measured against the others on an H100 (``benchmarks/bench_ops.py``, read in
docs/design.md); the rule is fixed, not autotuned, so it is safe inside a CUDA-graph capture:

- ``ROW``: the whole-row GEMV (``_row_gemv.py``), norm computed once per program.
- ``CHUNKED``: the chunked tensor-core GEMV (``_norm_gemv.py``), RMS pre-pass per 32-row tile.
- ``UNFUSED``: our (add +) RMSNorm kernel, then cuBLAS, then (MLP) our SiLU·mul kernel.
"""

import torch
import torch.nn.functional as F

from vllm_mirage.ops._norm_gemv import norm_gemv, silu_mul_triton
from vllm_mirage.ops._row_gemv import fits, row_gemv
from vllm_mirage.ops.add_rms_norm import rms_norm_triton

ROW, CHUNKED, UNFUSED = "row GEMV", "chunked GEMV", "norm kernel + cuBLAS"

# Up to this many tokens the whole-row GEMV runs the norm ops: at T = 4 its CUDA-core dot products and
# per-slab reductions cost more than the saved norm (0.90-1.04x of norm + cuBLAS).
ROW_MAX_TOKENS = 2
# Up to this many tokens the chunked GEMV may run; the forced GEMV lost to norm + cuBLAS at T = 16 on 5
# of 6 Qwen3 shapes.
GEMV_MAX_TOKENS = 8


def linear_path(T: int, H: int, has_norm: bool, silu_mul: bool) -> str:
    """- norm + linear, norm + gate_up + SiLU at T <= 2: ``ROW`` (1.08-1.31x of norm + cuBLAS on Qwen3
      0.6B/1.7B/8B, where the chunked kernel was 0.81-1.17x).
    - gate_up + SiLU without a norm at T <= 8: ``CHUNKED`` (1.03-1.23x; the row GEMV is within 3% of it
      at 1.7B/8B and 6% slower at 0.6B).
    - norm + gate_up + SiLU at 2 < T <= 8: ``CHUNKED`` only at H <= 1024 (1.16x on 0.6B; 0.90-0.97x
      at H = 2048 and 4096).
    - everything else, and every T > 8: ``UNFUSED``.
    """
    if has_norm and T <= ROW_MAX_TOKENS and fits(T, H):
        return ROW
    if T > GEMV_MAX_TOKENS or (has_norm and not silu_mul):
        return UNFUSED
    return CHUNKED if not has_norm or H <= 1024 else UNFUSED


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the op on the path ``linear_path`` picks. Returns ``(out, new_residual or None)``."""
    path = linear_path(x.shape[0], x.shape[1], norm_weight is not None, silu_mul)
    return _KERNELS[path](x, weight, norm_weight, eps, residual=residual, silu_mul=silu_mul)

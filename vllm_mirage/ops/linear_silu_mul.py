"""Merged gate_up linear → SiLU-and-mul without materialising the ``[T, 2I]`` tensor.

``linear_silu_mul(x, weight) = silu(x @ gate.T) * (x @ up.T)`` with vLLM's merged ``weight = [gate; up]``.
The same kernel as the norm variant, with the prologue switched off.
"""

import torch

from vllm_mirage.ops import reference
from vllm_mirage.ops._dispatch import record, register_op, use_triton
from vllm_mirage.ops._linear_paths import fused_or_unfused


def _fake(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0] // 2))


@register_op("linear_silu_mul", _fake)
def _op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    triton_ok = use_triton(x)
    record("linear_silu_mul", triton_ok)
    if not triton_ok:
        return reference.linear_silu_mul(x, weight)
    return fused_or_unfused(x, weight, silu_mul=True)[0]


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x``: ``[T, H]``, ``weight``: ``[2I, H]``; returns ``[T, I]``."""
    return _op(x, weight)

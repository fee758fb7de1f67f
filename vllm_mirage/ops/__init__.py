"""Fused Triton ops for Qwen3 decode, each a torch custom op with a PyTorch reference in ``reference``."""

from vllm_mirage.ops import reference
from vllm_mirage.ops._dispatch import dispatch_counts
from vllm_mirage.ops.add_rms_norm import add_rms_norm
from vllm_mirage.ops.linear_silu_mul import linear_silu_mul
from vllm_mirage.ops.qk_norm_rope import qk_norm_rope
from vllm_mirage.ops.rms_norm_linear import rms_norm_linear
from vllm_mirage.ops.rms_norm_linear_silu_mul import rms_norm_linear_silu_mul

__all__ = [
    "add_rms_norm",
    "dispatch_counts",
    "linear_silu_mul",
    "qk_norm_rope",
    "reference",
    "rms_norm_linear",
    "rms_norm_linear_silu_mul",
]

"""vllm-mirage: fused Triton kernels for Qwen3 inside vLLM, switched on by ``VLLM_USE_MIRAGE=1``."""

from vllm_mirage.switch import is_mirage_enabled, set_use_mirage

__all__ = ["is_mirage_enabled", "set_use_mirage"]
__version__ = "0.1.0"

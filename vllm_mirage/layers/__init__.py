"""Fused modules that compute through references to vLLM's own layers.

None of them owns a parameter: each keeps plain (unregistered) references to the vLLM layers whose
weights it reads, so ``named_parameters()``, ``state_dict()``, the weight loader, tensor-parallel
sharding and quantization metadata are exactly those of the stock model.
"""

from vllm_mirage.layers.fused import FusedQKNormRope, FusedRMSNormGateUp, FusedRMSNormQKV

__all__ = ["FusedQKNormRope", "FusedRMSNormGateUp", "FusedRMSNormQKV"]

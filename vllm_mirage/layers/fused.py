"""The three fusions of a Qwen3 decoder layer (see ``vllm_mirage.models.qwen3``).

Residual convention, the same as vLLM's ``RMSNorm(x, residual)``: on the first layer
``residual`` is None and the input itself becomes the residual; afterwards the norm sees
``x + residual`` and returns it as the new residual.
"""

import torch
from torch import nn

from vllm_mirage import ops


def _hold(module: nn.Module, **refs: nn.Module) -> None:
    # object.__setattr__ bypasses nn.Module registration: the referenced layers stay owned (and
    # named) by the stock model, so the fused module adds nothing to named_parameters/state_dict.
    for name, ref in refs.items():
        object.__setattr__(module, name, ref)


class FusedRMSNormQKV(nn.Module):
    """``input_layernorm`` + ``qkv_proj`` in one kernel: the normalized activations never reach memory."""

    def __init__(self, norm_layer: nn.Module, qkv_proj: nn.Module):
        super().__init__()
        _hold(self, norm_layer=norm_layer, qkv_proj=qkv_proj)

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.norm_layer
        weight = self.qkv_proj.weight
        if residual is None:
            qkv = ops.rms_norm_linear(hidden_states, norm.weight, weight, norm.variance_epsilon)
            return qkv, hidden_states
        return ops.rms_norm_linear(
            hidden_states, norm.weight, weight, norm.variance_epsilon, residual=residual
        )


class FusedQKNormRope(nn.Module):
    """Per-head ``q_norm``/``k_norm`` and the rotary embedding in one pass over q and k."""

    def __init__(self, q_norm: nn.Module, k_norm: nn.Module, rotary_emb: nn.Module):
        super().__init__()
        _hold(self, q_norm=q_norm, k_norm=k_norm, rotary_emb=rotary_emb)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.qk_norm_rope(
            q,
            k,
            self.q_norm.weight,
            self.k_norm.weight,
            positions,
            self.rotary_emb.cos_sin_cache,
            self.q_norm.variance_epsilon,
        )


class FusedRMSNormGateUp(nn.Module):
    """``post_attention_layernorm`` + residual add + ``gate_up_proj`` + SiLU-and-mul in one kernel.

    Returns ``(silu(gate) * up, new_residual)``; the ``[T, 2I]`` gate/up tensor is never written.
    """

    def __init__(self, norm_layer: nn.Module, gate_up_proj: nn.Module):
        super().__init__()
        _hold(self, norm_layer=norm_layer, gate_up_proj=gate_up_proj)

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.norm_layer
        return ops.rms_norm_linear_silu_mul(
            hidden_states,
            norm.weight,
            self.gate_up_proj.weight,
            norm.variance_epsilon,
            residual=residual,
        )

"""Qwen3 for vLLM with Mirage fused modules.

``MirageQwen3ForCausalLM`` is vLLM's own ``Qwen3ForCausalLM``; when ``VLLM_USE_MIRAGE=1`` it swaps each
decoder layer for a ``MirageQwen3DecoderLayer`` that adopts the stock layer's children under the same
names (so parameters, weight loading and TP sharding are untouched) and runs

    fused norm+QKV -> fused q/k-norm+rope -> vLLM attention -> o_proj
    -> fused add+norm+gate_up+SiLU -> down_proj

With ``VLLM_USE_MIRAGE=megakernel`` it also runs pure-decode steps through the megakernel's task graph
(``vllm_mirage.megakernel.bridge``). Anything the kernels do not support leaves the stock layers (or the
fused layers) in place, with the reason logged and kept in ``model.mirage_status``.
"""

import logging

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM

from vllm_mirage.layers import FusedQKNormRope, FusedRMSNormGateUp, FusedRMSNormQKV
from vllm_mirage.models.support import (
    layer_unsupported_reason,
    megakernel_unsupported_reason,
    model_unsupported_reason,
    platform_name,
)
from vllm_mirage.switch import mirage_mode

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger tree: see plugin.py


class MirageQwen3DecoderLayer(nn.Module):
    """A Qwen3 decoder layer whose norms, projections and activation run as three fused ops."""

    def __init__(self, layer: Qwen3DecoderLayer):
        super().__init__()
        # Adopt the stock children under their own names: "layers.N.self_attn.qkv_proj.weight" stays
        # the parameter's name, and the Attention module keeps its registration in vLLM's forward
        # context (keyed by its prefix, which does not change).
        for name, child in layer.named_children():
            self.add_module(name, child)
        attn = self.self_attn
        self.norm_qkv = FusedRMSNormQKV(self.input_layernorm, attn.qkv_proj)
        self.qk_norm_rope = FusedQKNormRope(attn.q_norm, attn.k_norm, attn.rotary_emb)
        self.norm_gate_up = FusedRMSNormGateUp(self.post_attention_layernorm, self.mlp.gate_up_proj)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.self_attn
        qkv, residual = self.norm_qkv(hidden_states, residual)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = self.qk_norm_rope(positions, q, k)
        hidden_states, _ = attn.o_proj(attn.attn(q, k, v))
        hidden_states, residual = self.norm_gate_up(hidden_states, residual)
        hidden_states, _ = self.mlp.down_proj(hidden_states)
        return hidden_states, residual


class MirageQwen3ForCausalLM(Qwen3ForCausalLM):
    """vLLM's Qwen3ForCausalLM, with fused decoder layers when Mirage is on and the model allows it."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        mode = mirage_mode()
        self.mirage_status = {"mode": "off", "fused_layers": 0, "reason": None}
        if mode == "off":
            return
        reason = model_unsupported_reason(vllm_config) or self._layers_unsupported_reason()
        if reason is not None:
            self.mirage_status["reason"] = reason
            _log_rank0(logging.WARNING, "vllm-mirage: using the stock Qwen3 path because %s", reason)
            return
        megakernel_reason = megakernel_unsupported_reason(vllm_config) if mode == "megakernel" else None
        if megakernel_reason is not None:
            mode = "fused"
            self.mirage_status["megakernel_reason"] = megakernel_reason
            _log_rank0(logging.WARNING, "vllm-mirage: megakernel decode off (fused layers only) because %s",
                       megakernel_reason)
        fused = self._fuse_layers(keep_all_weights=mode == "megakernel")
        self.mirage_status.update(mode=mode, fused_layers=fused)
        _key_compile_cache(vllm_config, mode)
        if mode == "megakernel":
            self.mirage_status["megakernel_steps"] = 0
            self._megakernel = None  # built at the first step: vLLM may replace weights after loading
        _log_rank0(
            logging.INFO,
            "vllm-mirage: fused %d Qwen3 decoder layers on %s "
            "(input_layernorm+qkv_proj, q/k norm+rope, post_attention_layernorm+gate_up_proj+SiLU)%s",
            fused,
            platform_name(),
            "; pure-decode steps as one megakernel task graph" if mode == "megakernel" else "",
        )

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self.mirage_status["mode"] == "megakernel" and intermediate_tensors is None and inputs_embeds is None:
            if self._megakernel is None:
                from vllm_mirage.megakernel.bridge import MegakernelDecoder

                self._megakernel = MegakernelDecoder(self)
            hidden = self._megakernel(input_ids, positions)
            if hidden is not None:
                return hidden
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def _stock_layers(self) -> list[tuple[int, Qwen3DecoderLayer]]:
        # Pipeline parallelism leaves PPMissingLayer placeholders for other ranks' layers.
        return [(i, l) for i, l in enumerate(self.model.layers) if isinstance(l, Qwen3DecoderLayer)]

    def _layers_unsupported_reason(self) -> str | None:
        for i, layer in self._stock_layers():
            reason = layer_unsupported_reason(layer)
            if reason is not None:
                return f"layer {i}: {reason}"
        return None

    def _fuse_layers(self, keep_all_weights: bool = False) -> int:
        on_cpu = platform_name() == "cpu"
        stock = self._stock_layers()
        for i, layer in stock:
            if on_cpu:
                # vLLM's CPU linear repacks the weight for oneDNN after loading and frees the
                # original; the fused ops (and the megakernel, all four) read it directly: keep it.
                linears = [layer.self_attn.qkv_proj, layer.mlp.gate_up_proj]
                if keep_all_weights:
                    linears += [layer.self_attn.o_proj, layer.mlp.down_proj]
                for linear in linears:
                    linear._cpu_skip_gemm_dispatch = True
            self.model.layers[i] = MirageQwen3DecoderLayer(layer)
        return len(stock)


def _key_compile_cache(vllm_config: VllmConfig, mode: str) -> None:
    """Put the mode into the config's hash, which keys vLLM's torch.compile cache (read at the first
    forward, after this). vLLM's key holds the config and the model's forward, not the layers inside,
    so without this a Mirage run and a stock run of one model share compiled graphs: on vLLM 0.26 a
    stock engine after a Mirage one loaded the fused graph and failed (KeyError 'norm_qkv'), and a Mirage
    engine after a stock one ran stock's graph (docs/design.md). ``additional_config`` is
    hashed as JSON when it is a dict (vLLM's default); a platform's own config object is left alone."""
    extra = vllm_config.additional_config
    if isinstance(extra, dict):
        extra["vllm_mirage"] = mode
    else:
        _log_rank0(logging.WARNING, "vllm-mirage: additional_config is a %s, not a dict: the compile cache is "
                   "keyed as stock vLLM's; use a VLLM_CACHE_ROOT of its own for Mirage", type(extra).__name__)


def _log_rank0(level: int, msg: str, *args) -> None:
    from vllm.distributed import get_tensor_model_parallel_rank

    if get_tensor_model_parallel_rank() == 0:
        logger.log(level, msg, *args)

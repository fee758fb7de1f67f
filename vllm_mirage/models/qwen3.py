"""Qwen3 for vLLM with Mirage fused modules.

``MirageQwen3ForCausalLM`` is vLLM's own ``Qwen3ForCausalLM``: the stock ``Qwen3Model`` keeps its layers,
parameters and torch.compile'd forward. When ``VLLM_USE_MIRAGE=1`` a ``FusedQwen3Decoder`` beside it holds
one ``MirageQwen3DecoderLayer`` per stock layer, which adopts that layer's children (references, no copies)
and runs

    fused norm+QKV -> fused q/k-norm+rope -> vLLM attention -> o_proj
    -> fused add+norm+gate_up+SiLU -> down_proj

for the decode steps where that is faster on this GPU; the other steps run the stock model. With
``VLLM_USE_MIRAGE=megakernel`` small pure-decode steps run the megakernel's task graph
(``vllm_mirage.megakernel.bridge``) instead. Anything the kernels do not support leaves the stock path (or
the fused layers) in place, with the reason logged and kept in ``model.mirage_status``.

Because the compiled module is stock's in every mode, stock and Mirage engines share vLLM's compile cache.
"""

import dataclasses
import logging

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM

from vllm_mirage import ops
from vllm_mirage.introspect import register_draft
from vllm_mirage.layers import FusedQKNormRope, FusedRMSNormGateUp, FusedRMSNormQKV
from vllm_mirage.models.step import full_graph_tokens, max_query_len
from vllm_mirage.models.support import (
    is_draft_model,
    is_self_draft,
    layer_unsupported_reason,
    megakernel_unsupported_reason,
    model_unsupported_reason,
    platform_name,
)
from vllm_mirage.ops._dispatch import interpreted
from vllm_mirage.ops._linear_paths import register_plan
from vllm_mirage.switch import mirage_mode
from vllm_mirage.tuning import DecodePlan, ModelShape, decode_plan, plan_override, reference_plan
from vllm_mirage.tuning.plan import UNBOUNDED

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


class FusedQwen3Decoder(nn.Module):
    """``Qwen3Model.forward`` for the steps that take the fused layers: embedding, the fused decoder layers
    (which adopt the stock layers' children), the final add + norm. It holds references only; the stock
    ``Qwen3Model`` keeps owning (and naming) every parameter and stays vLLM's compiled module for the rest."""

    def __init__(self, model: nn.Module, layers: list[Qwen3DecoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(MirageQwen3DecoderLayer(layer) for layer in layers)
        object.__setattr__(self, "embed_tokens", model.embed_tokens)
        object.__setattr__(self, "norm", model.norm)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        return ops.add_rms_norm(hidden_states, residual, self.norm.weight, self.norm.variance_epsilon)[0]


# The input ids of each target model's latest step, by its first attention layer's name: a self-draft that
# shares the target's KV cache tells the tokens EAGLE hands it apart with them (models/self_draft.py).
# vLLM passes the target a view of its persistent input buffer, so CUDA graphs that read it stay current.
TARGET_INPUT_IDS: dict[str, torch.Tensor] = {}


class MirageQwen3ForCausalLM(Qwen3ForCausalLM):
    """vLLM's Qwen3ForCausalLM, with fused decoder layers when Mirage is on and the model allows it.

    Each step takes one of three paths, chosen where it is cheapest on this GPU (``DecodePlan``):
    decode steps of up to ``megakernel_max_batch`` tokens run the megakernel (mode ``megakernel``; a
    self-draft's verify pass of a few tokens a request counts as such a step); pure-decode batches of up
    to ``fused_max_tokens`` that vLLM replays as full CUDA graphs run the fused layers; everything else
    (prefill, mixed batches, larger decode batches) runs stock vLLM's compiled layers, at stock's cost.

    The same class builds the draft model of vLLM's draft-model speculative decoding when the draft is a
    Qwen3 checkpoint (the target itself, in ``vllm-mirage``'s multi-token mode): its one-token draft steps
    follow the same plan, without the fused layers on a GPU (``_draft_plan``).
    """

    # Set by a class that vLLM only ever builds as a speculative draft (models/self_draft.py).
    drafts_for_target = False
    _records_inputs = False
    _max_query = 1  # new tokens a request in a megakernel step (see __init__)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        mode = mirage_mode()
        self.mirage_status = {"mode": "off", "fused_layers": 0, "reason": None}
        if mode == "off":
            return
        reason = model_unsupported_reason(vllm_config) or self._layers_unsupported_reason()
        if reason is not None:
            self.mirage_status["reason"] = reason
            log_rank0(logging.WARNING, "vllm-mirage: using the stock Qwen3 path because %s", reason)
            return
        draft = self.drafts_for_target or is_draft_model(vllm_config)
        megakernel_reason = megakernel_unsupported_reason(vllm_config, draft) if mode == "megakernel" else None
        plan = self._decode_plan(vllm_config)
        if draft:
            plan = self._draft_plan(plan)
            register_draft(self)
        if mode == "megakernel" and megakernel_reason is None and plan.megakernel_max_batch == 0:
            megakernel_reason = ("the plan for this GPU and model shape runs it at no batch size "
                                 f"({plan.source}: {plan.notes.get('megakernel_max_batch', 'not measured')})")
        if megakernel_reason is not None:
            mode = "fused"
            self.mirage_status["megakernel_reason"] = megakernel_reason
            log_rank0(logging.WARNING, "vllm-mirage: megakernel decode off (fused layers only) because %s",
                      megakernel_reason)
        stock = self._stock_layers()
        _keep_cpu_weights(stock, keep_all=mode == "megakernel")
        object.__setattr__(self, "_fused", FusedQwen3Decoder(self.model, [layer for _, layer in stock]))
        self._vllm_config = vllm_config
        self._attn_name = stock[0][1].self_attn.attn.layer_name
        self._plan = plan
        self.mirage_status.update(
            mode=mode, role="draft" if draft else "target",
            fused_layers=len(stock), plan=plan.source, fused_max_tokens=plan.fused_max_tokens,
            megakernel_max_batch=plan.megakernel_max_batch if mode == "megakernel" else 0,
        )
        if mode == "megakernel":
            self.mirage_status["megakernel_steps"] = 0
            self.mirage_status["megakernel_launch"] = dict(plan.megakernel_launch)
            self._megakernel = None  # built at the first step: vLLM may replace weights after loading
            from vllm_mirage.megakernel.bridge import MAX_QUERY_ROWS

            # A self-draft's target verifies on the megakernel too (a few new tokens a request), so that
            # draft and verify round alike; other models' multi-token steps stay stock's.
            self._max_query = MAX_QUERY_ROWS if is_self_draft(vllm_config) and not draft else 1
        speculative = vllm_config.speculative_config
        self._records_inputs = not draft and getattr(speculative, "method", None) == "eagle"
        log_rank0(
            logging.INFO,
            "vllm-mirage: fused %d Qwen3 decoder layers on %s (input_layernorm+qkv_proj, q/k norm+rope, "
            "post_attention_layernorm+gate_up_proj+SiLU) for %s%s; other steps run stock vLLM's layers (%s)",
            len(stock),
            platform_name(),
            "every pure-decode batch" if plan.fused_max_tokens >= UNBOUNDED
            else f"pure-decode batches of up to {plan.fused_max_tokens} tokens",
            f"; decode and verify steps as one megakernel task graph up to {plan.megakernel_max_batch} tokens"
            if mode == "megakernel" else "",
            plan.source,
        )

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self._records_inputs:
            TARGET_INPUT_IDS[self._attn_name] = input_ids
        path, query = "stock", None
        if self.mirage_status["fused_layers"] and intermediate_tensors is None and inputs_embeds is None:
            query = max_query_len(self._attn_name)
            path = self._step_path(positions.shape[0], query)
        if path == "megakernel":
            if self._megakernel is None:
                from vllm_mirage.megakernel.bridge import MegakernelDecoder

                self._megakernel = MegakernelDecoder(self, max_batch=self._plan.megakernel_max_batch,
                                                     max_query=self._max_query,
                                                     launch=self._plan.megakernel_launch)
            hidden = self._megakernel(input_ids, positions)
            if hidden is not None:
                return hidden
            path = self._decode_path(positions.shape[0]) if query == 1 else "stock"
        if path == "fused":
            return self._fused(input_ids, positions)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def _step_path(self, tokens: int, query: int | None) -> str:
        """The path for a step of ``tokens`` tokens whose requests add at most ``query`` tokens each."""
        if self.mirage_status["mode"] == "megakernel" and query is not None and 1 <= query <= self._max_query:
            # A decode, or a self-draft's verify pass. The bridge declines (and says why) past the plan's
            # limit, in tokens: rows of one request cost the kernel what rows of several do.
            return "megakernel"
        return self._decode_path(tokens) if query == 1 else "stock"

    def _decode_path(self, tokens: int) -> str:
        """Fused layers or stock's for a pure-decode step. On a GPU the fused layers' host code is paid back
        only inside a replayed CUDA graph; on CPU (correctness, no graphs) they run at every decode step."""
        graph_limit = full_graph_tokens(self._vllm_config) if platform_name() == "cuda" else UNBOUNDED
        return "fused" if tokens <= min(self._plan.fused_max_tokens, graph_limit) else "stock"

    @staticmethod
    def _draft_plan(plan: DecodePlan) -> DecodePlan:
        """A draft model's steps on a GPU: vLLM 0.26 runs a draft_model drafter under piecewise CUDA graphs
        only, so the fused layers' host code is never paid back there (stock's pieces run instead); the
        EAGLE route's full-graph draft steps keep the same plan until they are timed. The megakernel keeps
        the plan's limit, the batch sizes where it was measured faster than stock."""
        if platform_name() != "cuda":
            return plan
        return dataclasses.replace(plan, fused_max_tokens=0, source=plan.source + " (draft model: no fused layers)")

    def _decode_plan(self, vllm_config: VllmConfig) -> DecodePlan:
        from vllm_mirage.megakernel.bridge import MAX_BATCH

        if platform_name() != "cuda" or interpreted():
            plan = plan_override() or reference_plan(megakernel_max_batch=MAX_BATCH)
            plan.megakernel_max_batch = min(plan.megakernel_max_batch, MAX_BATCH)
            return plan
        layer = self._stock_layers()[0][1]
        attn = layer.self_attn
        shape = ModelShape(
            hidden=vllm_config.model_config.hf_config.hidden_size,
            intermediate=layer.mlp.gate_up_proj.weight.shape[0] // 2,
            q_heads=attn.num_heads, kv_heads=attn.num_kv_heads, head_dim=attn.head_dim,
            tp=vllm_config.parallel_config.tensor_parallel_size,
            dtype=str(vllm_config.model_config.dtype).removeprefix("torch."),
        )
        plan = decode_plan(shape, vllm_config.model_config.dtype, megakernel_limit=MAX_BATCH)
        register_plan(shape.hidden, plan)
        return plan

    def _stock_layers(self) -> list[tuple[int, Qwen3DecoderLayer]]:
        # Pipeline parallelism leaves PPMissingLayer placeholders for other ranks' layers.
        return [(i, l) for i, l in enumerate(self.model.layers) if isinstance(l, Qwen3DecoderLayer)]

    def _layers_unsupported_reason(self) -> str | None:
        for i, layer in self._stock_layers():
            reason = layer_unsupported_reason(layer)
            if reason is not None:
                return f"layer {i}: {reason}"
        return None


def _keep_cpu_weights(layers: list[tuple[int, Qwen3DecoderLayer]], keep_all: bool) -> None:
    """vLLM's CPU linear repacks the weight for oneDNN after loading and frees the original; the fused ops
    (and the megakernel, all four linears) read it directly: keep it."""
    if platform_name() != "cpu":
        return
    for _, layer in layers:
        linears = [layer.self_attn.qkv_proj, layer.mlp.gate_up_proj]
        if keep_all:
            linears += [layer.self_attn.o_proj, layer.mlp.down_proj]
        for linear in linears:
            linear._cpu_skip_gemm_dispatch = True


def log_rank0(level: int, msg: str, *args) -> None:
    from vllm.distributed import get_tensor_model_parallel_rank

    if get_tensor_model_parallel_rank() == 0:
        logger.log(level, msg, *args)

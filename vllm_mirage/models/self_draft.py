"""Qwen3 drafting for itself through vLLM's EAGLE speculator.

vLLM resolves ``speculative_config: {"method": "eagle", "model": <a plain Qwen3 checkpoint>}`` to the
architecture ``EagleQwen3ForCausalLM``, which vLLM itself does not provide; the plugin registers this class
under that name. The draft is the whole model (the target's own weights, loaded a second time), so it
ignores the target's hidden states that EAGLE heads take, and its one-token draft steps follow the decode
plan like any Qwen3 step (the megakernel, in mode ``megakernel``). vLLM's EAGLE path runs later draft steps
as full CUDA graphs with on-GPU sampling between them, where ``draft_model`` runs piecewise graphs.

EAGLE's convention shifts the draft's inputs one token left at unchanged positions: the draft is handed
token ``i + 1`` at position ``i``, for its catch-up over the target's tokens and its draft steps alike.
Every token the draft sees, and every key in its own KV cache, is thus one position early; rotary attention
depends only on the distance between positions, so that changes nothing but one thing: the draft never
sees a sequence's first token. That lowers acceptance, never correctness: the target's verify pass
decides every token. How much it lowers it depends on the model: ``benchmarks/first_token_dependence.py``
measures the ceiling (the share of positions whose greedy token survives dropping the first one), and on
a scaled random Qwen3-0.6B it is about nil, so the class warns when it is built.
"""

from __future__ import annotations

import logging

from vllm.config import VllmConfig
from vllm.model_executor.models.utils import maybe_prefix

from vllm_mirage.models.qwen3 import MirageQwen3ForCausalLM, log_rank0

FIRST_TOKEN_WARNING = (
    "vllm-mirage: the model drafts for itself through vLLM's EAGLE speculator, which never shows the draft a "
    "sequence's first token; where the model depends on that token most drafts are rejected and the step costs "
    "more than a plain decode (benchmarks/first_token_dependence.py measures it). Output is unchanged; "
    '"method": "draft_model" gives the draft every token'
)


class MirageQwen3SelfDraft(MirageQwen3ForCausalLM):
    drafts_for_target = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        # Attention layers register by name: the draft's must not collide with the target's.
        super().__init__(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "draft"))
        log_rank0(logging.WARNING, FIRST_TOKEN_WARNING)

    def forward(self, input_ids, positions, hidden_states=None, inputs_embeds=None, **kwargs):
        hidden = super().forward(input_ids, positions, inputs_embeds=inputs_embeds, **kwargs)
        # EAGLE heads return (states for the logits, states fed to the next draft step); this one reads none.
        return hidden, hidden

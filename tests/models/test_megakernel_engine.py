"""VLLM_USE_MIRAGE=megakernel inside real vLLM (CPU build): pure-decode steps go through the task graph,
prefill through the fused layers, over vLLM's own KV cache, and the tokens are stock vLLM's."""

from tests.conftest import PROMPTS

MAX_TOKENS = 12


def _spec(model, **kw):
    return {"model": str(model), "dtype": "float32", "prompts": PROMPTS, "max_tokens": MAX_TOKENS, **kw}


def test_megakernel_decode_gives_stock_tokens(tiny_qwen3, run_engine):
    stock = run_engine(_spec(tiny_qwen3), env={"VLLM_USE_MIRAGE": "0"})
    mega = run_engine(_spec(tiny_qwen3), env={"VLLM_USE_MIRAGE": "megakernel"})
    status = mega["model"]["mirage_status"]
    assert status["mode"] == "megakernel" and status["fused_layers"] == 2, status
    # One prefill step for the batch, then every further token is a pure-decode step.
    assert status["megakernel_steps"] >= MAX_TOKENS - 1, status
    assert mega["token_ids"] == stock["token_ids"]
    assert any("decode and verify steps as one megakernel task graph" in line for line in mega["mirage_log"])


def test_multi_token_drafts_on_the_megakernel_and_keeps_stock_tokens(tiny_qwen3, run_engine):
    """Multi-token mode: vLLM's draft-model speculative decoding with the model as its own draft. The draft
    model's one-token steps run the megakernel (three per engine step), the target's verify passes run
    stock's forward and decide every token: greedy output equals stock's one-token-per-step decode."""
    speculative = {"method": "draft_model", "model": str(tiny_qwen3), "num_speculative_tokens": 3}
    stock = run_engine(_spec(tiny_qwen3), env={"VLLM_USE_MIRAGE": "0"})
    multi = run_engine(_spec(tiny_qwen3, engine_args={"speculative_config": speculative, "disable_log_stats": False}),
                       env={"VLLM_USE_MIRAGE": "megakernel"})
    assert multi["token_ids"] == stock["token_ids"]
    target = multi["model"]["mirage_status"]
    assert target["role"] == "target" and "speculative decoding (draft_model)" in target["megakernel_reason"]
    draft = target["draft"]
    assert draft["role"] == "draft" and draft["mode"] == "megakernel", draft
    assert draft["megakernel_steps"] > 0 and not draft["megakernel_declined"], draft
    # Draft and target are the same float32 model: every draft is accepted, so engine steps yield 4 tokens.
    spec = multi["speculative"]
    assert spec["num_draft_tokens"] > 0 and spec["num_accepted_tokens"] == spec["num_draft_tokens"], spec


def test_self_draft_through_eagle_is_exact(tiny_qwen3, run_engine):
    """The model as its own EAGLE draft (models/self_draft.py): vLLM resolves ``method: eagle`` on a plain Qwen3
    checkpoint to EagleQwen3ForCausalLM, which the plugin registers. In megakernel mode the draft shares the
    target's KV cache (here vLLM's CPU cache, read as strided views) and runs each token one position ahead of
    EAGLE's, so a draft token is the target's own next token: in float32 every draft is accepted, and the
    target's verify passes keep greedy output stock's."""
    speculative = {"method": "eagle", "model": str(tiny_qwen3), "num_speculative_tokens": 3}
    stock = run_engine(_spec(tiny_qwen3), env={"VLLM_USE_MIRAGE": "0"})
    # Four requests at a time: a verify pass of 4 tokens each fits the megakernel's 16 rows.
    args = {"speculative_config": speculative, "disable_log_stats": False, "max_num_seqs": 4}
    eagle = run_engine(_spec(tiny_qwen3, engine_args=args), env={"VLLM_USE_MIRAGE": "megakernel"})
    assert eagle["token_ids"] == stock["token_ids"]
    target = eagle["model"]["mirage_status"]
    # The target's verify passes run as megakernel rows too, each request's tokens attending causally.
    assert target["role"] == "target" and target["mode"] == "megakernel" and "megakernel_reason" not in target
    assert target["megakernel_steps"] > 0 and not target["megakernel_declined"], target
    draft = target["draft"]
    assert draft["role"] == "draft" and draft["mode"] == "megakernel" and draft["megakernel_steps"] > 0, draft
    assert draft["draft_reads_target_cache"] is True and not draft["megakernel_declined"], draft
    spec = eagle["speculative"]
    assert spec["num_draft_tokens"] > 0 and spec["num_accepted_tokens"] == spec["num_draft_tokens"], spec
    assert not any("never shows the draft a sequence's first token" in line for line in eagle["mirage_log"])
    assert not any("not a power of two" in line for line in eagle["mirage_log"])


def test_sampled_self_draft_runs_on_the_megakernel(tiny_qwen3, run_engine):
    """At temperature > 0 (seeded, drafts drawn from the draft's own distribution) the exact self-draft keeps
    its form: draft rows over the target's cache, verify passes on the megakernel, every request's tokens.
    A token sampled after a rejected draft is drawn from the residual, where that draft has no mass, so the
    rule that finds each request's row (draft_rows.py) holds here too. vLLM's rejection sampler decides
    which tokens are kept, so the output follows the target's distribution; how many drafts it accepts is
    vLLM's matter (docs/design.md: a perfect draft is accepted rarely at temperature 1 on this model)."""
    speculative = {"method": "eagle", "model": str(tiny_qwen3), "num_speculative_tokens": 3,
                   "draft_sample_method": "probabilistic"}
    args = {"speculative_config": speculative, "disable_log_stats": False, "max_num_seqs": 4}
    sampled = run_engine(_spec(tiny_qwen3, engine_args=args, temperature=1.0, seed=7),
                         env={"VLLM_USE_MIRAGE": "megakernel"})
    assert all(len(ids) == MAX_TOKENS for ids in sampled["token_ids"])
    status = sampled["model"]["mirage_status"]
    # Passes over the megakernel's token limit take stock's forward (logged), as any such pass does.
    assert status["megakernel_steps"] > 0, status
    draft = status["draft"]
    assert draft["megakernel_steps"] > 0 and draft["draft_reads_target_cache"] is True, draft
    assert not draft["megakernel_declined"], draft
    assert sampled["speculative"]["num_draft_tokens"] > 0, sampled["speculative"]
    # Sampled, not greedy: the same prompts decode to other tokens than at temperature 0.
    greedy = run_engine(_spec(tiny_qwen3), env={"VLLM_USE_MIRAGE": "0"})
    assert sampled["token_ids"] != greedy["token_ids"]


def test_shifted_self_draft_keeps_stock_tokens(tiny_qwen3, run_engine):
    """Outside megakernel mode the EAGLE self-draft runs as vLLM hands it its tokens, over a KV cache of its own:
    it never sees a sequence's first token, so it is accepted often but not always, and says so when built;
    at 3 tokens a step it also warns that vLLM's CUDA-graph sizes round to multiples of 3."""
    speculative = {"method": "eagle", "model": str(tiny_qwen3), "num_speculative_tokens": 2}
    stock = run_engine(_spec(tiny_qwen3), env={"VLLM_USE_MIRAGE": "0"})
    eagle = run_engine(_spec(tiny_qwen3, engine_args={"speculative_config": speculative, "disable_log_stats": False}),
                       env={"VLLM_USE_MIRAGE": "1"})
    assert eagle["token_ids"] == stock["token_ids"]
    draft = eagle["model"]["mirage_status"]["draft"]
    assert draft["role"] == "draft" and draft["draft_reads_target_cache"] is False, draft
    spec = eagle["speculative"]
    # Chance agreement over the tiny vocabulary is well under 1%: a draft that ran wrong would be rejected.
    assert spec["num_draft_tokens"] > 0 and 0.1 < spec["num_accepted_tokens"] / spec["num_draft_tokens"] < 1, spec
    assert any("never shows the draft a sequence's first token" in line for line in eagle["mirage_log"])
    assert any("num_speculative_tokens=2 makes 3 tokens a step" in line for line in eagle["mirage_log"])

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
    assert any("pure-decode steps as one megakernel task graph" in line for line in mega["mirage_log"])

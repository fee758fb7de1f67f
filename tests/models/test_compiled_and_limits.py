"""The fused layers under vLLM's default torch.compile (Dynamo + inductor), and at length limits."""

from tests.conftest import PROMPTS

SPEC = {"prompts": PROMPTS, "max_tokens": 16, "dtype": "float32", "enforce_eager": False, "max_model_len": 128,
        "probe_limits": True}


def test_compiled_fused_model_matches_stock_at_limits(tiny_qwen3, run_engine):
    spec = {**SPEC, "model": str(tiny_qwen3)}
    stock = run_engine(spec, env={"VLLM_USE_MIRAGE": "0"})
    fused = run_engine(spec, env={"VLLM_USE_MIRAGE": "1"})
    assert fused["model"]["mirage_status"]["mode"] == "fused"
    assert fused["token_ids"] == stock["token_ids"]
    # Limits are vLLM's business: the fused model must neither crash nor change the outcome.
    assert fused["limits"] == stock["limits"]
    assert stock["limits"]["empty"] == 0
    assert stock["limits"]["too_long"] is not None  # vLLM rejects it before the model runs
    ids, finish = stock["limits"]["near_limit"]
    assert finish == "length" and 0 < len(ids) <= 5

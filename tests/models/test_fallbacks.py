"""Configurations the megakernel or the kernels cannot take, inside real vLLM (CPU build): each falls back
to code that handles it, says why, and gives stock vLLM's tokens.

On CPU the megakernel's executor attends through vLLM's attention layer, so a window or a block size
it would mishandle on a GPU cannot show up in the tokens here: the tests check the decision itself
(the reason in ``mirage_status`` or the log), and the tokens of the path that serves instead.
"""

import pytest

from tests.conftest import PROMPTS

MAX_TOKENS = 12
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def _spec(model, **kw):
    # The same spec as tests/models/test_megakernel_engine.py's: run_engine reuses its stock run.
    return {"model": str(model), "dtype": "float32", "prompts": PROMPTS, "max_tokens": MAX_TOKENS, **kw}


@pytest.fixture(scope="module")
def stock(tiny_qwen3, run_engine):
    return run_engine(_spec(tiny_qwen3), env={"VLLM_USE_MIRAGE": "0"})


def test_window_head_dim_96_and_speculative_decoding_fall_back_to_fused_triton(
    tiny_qwen3_sliding_window, tiny_qwen3_head_dim_96, run_engine
):
    """One engine, three megakernel refusals: head_dim 96 (its attention tiles are powers of two), an
    8-token sliding window (it attends over the whole context) and n-gram speculative decoding. The fused
    layers serve, with the real Triton kernels (interpreted): q/k-norm+rope runs masked at head_dim 96,
    and vLLM's attention layer, which they call, keeps the window."""
    stock_window = run_engine(_spec(tiny_qwen3_sliding_window), env={"VLLM_USE_MIRAGE": "0"})
    # The window changes this model's tokens in stock vLLM, so equal tokens below mean it was kept.
    stock_full = run_engine(_spec(tiny_qwen3_head_dim_96), env={"VLLM_USE_MIRAGE": "0"})
    assert stock_window["token_ids"] != stock_full["token_ids"]

    mirage = run_engine(
        _spec(tiny_qwen3_sliding_window, engine_args={"speculative_config": NGRAM}),
        env={"VLLM_USE_MIRAGE": "megakernel", "TRITON_INTERPRET": "1"},
    )
    status = mirage["model"]["mirage_status"]
    assert status["mode"] == "fused" and status["fused_layers"] == 2, status
    reason = status["megakernel_reason"]
    for expected in ("head_dim 96 is not a power of two", "sliding-window attention (window 8)",
                     "speculative decoding (ngram)"):
        assert expected in reason, reason
    assert any(reason in line for line in mirage["mirage_log"])
    counts = {(op, backend): n for op, backend, n in mirage["model"]["dispatch_counts"]}
    assert counts.get(("qk_norm_rope", "triton"), 0) > 0 and ("qk_norm_rope", "reference") not in counts
    assert mirage["token_ids"] == stock_window["token_ids"]


def test_kv_block_size_the_kernel_refuses_is_declined_per_step(tiny_qwen3, run_engine, stock):
    """vLLM's CPU attention takes blocks of any multiple of 32; 96 is not a power of two, which the GPU
    kernel needs. The bridge asks the kernel's reason before building a graph, on CPU as on a GPU, and
    serves every step with the fused layers."""
    result = run_engine(_spec(tiny_qwen3, engine_args={"block_size": 96}), env={"VLLM_USE_MIRAGE": "megakernel"})
    status = result["model"]["mirage_status"]
    assert status["mode"] == "megakernel" and status["megakernel_steps"] == 0, status
    declines = [line for line in result["mirage_log"] if "megakernel not used for a step" in line]
    assert declines == ["vllm-mirage: megakernel not used for a step (the plan's next path takes it): "
                        "KV-cache block size 96 must be a power of two ≥ 16"], result["mirage_log"]
    assert result["token_ids"] == stock["token_ids"]


def test_fp8_kv_cache_refuses_the_megakernel_in_the_engine(tiny_qwen3, run_engine, stock):
    """vLLM's CPU build stores an fp8 KV cache only on x86 with AVX-512 or AMX; elsewhere it stops at
    start, after the model (and its refusal) was built. Either way the refusal must be there."""
    proc = run_engine(_spec(tiny_qwen3, engine_args={"kv_cache_dtype": "fp8"}),
                      env={"VLLM_USE_MIRAGE": "megakernel"}, check=False)
    assert ("megakernel decode off (fused layers only) because KV-cache dtype fp8 is not supported"
            in proc.stderr), proc.stderr[-3000:]
    if proc.returncode != 0:
        assert "FP8 KV cache on CPU requires" in proc.stderr, proc.stderr[-3000:]

"""vLLM's torch.compile cache is keyed on its config and the model's forward, not on the layers inside:
each Mirage mode must key its own (``models/qwen3.py: _key_compile_cache``). On vLLM 0.26 (GPU) a shared
key made a stock engine load the fused graph and fail, and a Mirage engine run stock's graph. The CPU
build fails to load its own artifacts and compiles again, so here the key itself is what is checked."""

import re

from tests.conftest import PROMPTS

SPEC = {"prompts": PROMPTS[:2], "max_tokens": 8, "dtype": "float32", "enforce_eager": False, "max_model_len": 128}
_SAVED = re.compile(r"saved AOT compiled function to (\S+)")


def _cache_dirs(result) -> set[str]:
    return set(_SAVED.findall(result["stderr"]))


def test_stock_and_fused_engines_key_their_own_compiled_graphs(tiny_qwen3, run_engine, tmp_path):
    spec = {**SPEC, "model": str(tiny_qwen3)}
    # vLLM logs to stdout, which run_engine drops; its stderr comes back.
    shared = {"VLLM_CACHE_ROOT": str(tmp_path / "shared-cache"), "VLLM_LOGGING_STREAM": "ext://sys.stderr"}
    fused = run_engine(spec, env={"VLLM_USE_MIRAGE": "1", **shared})
    stock = run_engine(spec, env={"VLLM_USE_MIRAGE": "0", **shared})
    assert fused["model"]["mirage_status"]["mode"] == "fused"
    assert _cache_dirs(fused) and _cache_dirs(stock), "vLLM no longer logs where it saves compiled graphs"
    assert not _cache_dirs(fused) & _cache_dirs(stock)
    assert fused["token_ids"] == stock["token_ids"]

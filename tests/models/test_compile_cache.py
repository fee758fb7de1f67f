"""vLLM's torch.compile cache is keyed on its config and the model's forward, not on the layers inside. The
compiled module is stock's ``Qwen3Model`` in every Mirage mode (the fused layers run beside it), so stock
and Mirage engines share one cache key and either may load what the other saved. On vLLM 0.26 (GPU) a
cache holding a graph of other layers made an engine fail (``KeyError: 'norm_qkv'``) or silently run the
other mode's layers: here a stock engine follows a Mirage one on one cache root, and the Mirage side's fused
ops ran."""

import re

from tests.conftest import PROMPTS

SPEC = {"prompts": PROMPTS[:2], "max_tokens": 8, "dtype": "float32", "enforce_eager": False, "max_model_len": 128}
_SAVED = re.compile(r"saved AOT compiled function to (\S+)")


def _cache_dirs(result) -> set[str]:
    return set(_SAVED.findall(result["stderr"]))


def _fused_ops_ran(result) -> bool:
    return any(op == "rms_norm_linear" and n > 0 for op, _, n in result["model"]["dispatch_counts"])


def test_stock_and_fused_engines_share_the_compiled_stock_graph(tiny_qwen3, run_engine, tmp_path):
    spec = {**SPEC, "model": str(tiny_qwen3)}
    # vLLM logs to stdout, which run_engine drops; its stderr comes back.
    shared = {"VLLM_CACHE_ROOT": str(tmp_path / "shared-cache"), "VLLM_LOGGING_STREAM": "ext://sys.stderr"}
    fused = run_engine(spec, env={"VLLM_USE_MIRAGE": "1", **shared})
    stock = run_engine(spec, env={"VLLM_USE_MIRAGE": "0", **shared})
    assert fused["model"]["mirage_status"]["mode"] == "fused" and _fused_ops_ran(fused)
    assert not _fused_ops_ran(stock)
    assert _cache_dirs(fused), "vLLM no longer logs where it saves compiled graphs"
    assert _cache_dirs(stock) <= _cache_dirs(fused)  # one key: the stock engine saved (if at all) where fused did
    assert fused["token_ids"] == stock["token_ids"]

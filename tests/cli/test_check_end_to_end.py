"""``vllm-mirage check`` against real vLLM on the tiny Qwen3 (each engine here costs ~15-25 s on CPU)."""

import json

import pytest

from tests.cli.conftest import clean_error, prompts_file
from vllm_mirage.cli.errors import EXIT_ENGINE, EXIT_NOT_APPLICABLE, EXIT_NOT_APPLIED, EXIT_OK

pytestmark = pytest.mark.slow


def test_check_tiny(run_cli, cli_cache, tmp_path):
    # Per-side engine arguments (how a TP=2 Mirage is held against a TP=1 stock) reach their side only.
    proc = run_cli("check", "--model", "tiny", "--max-tokens", "8", "--cache-dir", str(cli_cache),
                   "--output", str(tmp_path), "--baseline-args", '{"max_num_seqs": 32}')
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    out = proc.stdout
    # Plugin-dependent: the Mirage side must report fused layers through mirage_status.
    assert "Mirage applied: fused, 2 fused decoder layers" in out
    assert "dtype float32 (exact)" in out and "Verdict: PASS" in out

    report = json.loads((tmp_path / "check.json").read_text())
    stock, mirage = report["sides"]["stock"], report["sides"]["mirage"]
    assert stock["mirage_status"]["mode"] == "off" and mirage["mirage_status"]["mode"] == "fused"
    assert 'stock side only: {"max_num_seqs": 32}' in out
    assert stock["engine"]["args"]["max_num_seqs"] == 32 and "max_num_seqs" not in mirage["engine"]["args"]
    n_prompts = report["comparison"]["prompts"]
    assert n_prompts >= 120 and len(stock["token_ids"]) == len(mirage["token_ids"]) == n_prompts
    assert all(len(ids) == 8 for ids in stock["token_ids"] + mirage["token_ids"])
    # The tiny model's continuations must vary, or "identical tokens" would prove little.
    assert len({tuple(ids) for ids in stock["token_ids"]}) > n_prompts // 2
    assert report["comparison"]["exact_match_rate"] == 1.0
    # float32, same tokens: stock's top-5 logprobs agree at every step, up to summation order.
    lp = report["comparison"]["logprobs"]
    assert (lp["top_k"], lp["steps_compared"], lp["pairs"], lp["missing"]) == (5, 8 * n_prompts, 40 * n_prompts, 0)
    assert lp["max_diff"] < 1e-3 and len(lp["max_diff_by_step"]) == 8 and lp["first_top_token_difference"] is None
    assert f"|Logprob difference| on stock's top-5 tokens over {8 * n_prompts} shared-context steps" in out
    assert (tmp_path / "stock.log").stat().st_size > 0 and (tmp_path / "mirage.log").stat().st_size > 0


def test_check_tiny_megakernel(run_cli, cli_cache, tmp_path):
    prompts = prompts_file(tmp_path / "prompts.txt", 8)
    proc = run_cli("check", "--model", "tiny", "--max-tokens", "8", "--cache-dir", str(cli_cache), "--mode", "megakernel",
                   "--prompts", prompts, "--output", str(tmp_path), "--control", '{"max_num_seqs": 4}')
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "check.json").read_text())
    status = report["sides"]["mirage"]["mirage_status"]
    # The control: stock again, two batches of 4 instead of one of 8; float32 gives stock's tokens.
    control = report["control"]
    assert control["engine_args"] == {"max_num_seqs": 4} and control["comparison"]["exact_matches"] == 8
    assert report["sides"]["control"]["engine"]["args"]["max_num_seqs"] == 4
    assert report["sides"]["control"]["mirage_status"]["mode"] == "off"
    assert 'Control, stock against stock with {"max_num_seqs": 4}: identical sequences 8/8' in proc.stdout
    assert status["mode"] == "megakernel" and status["megakernel_steps"] >= 7  # every decode step of the batch
    assert f"Mirage applied: megakernel, 2 fused decoder layers, {status['megakernel_steps']} decode steps" in proc.stdout
    assert "Verdict: PASS" in proc.stdout


def _check_self_draft(run_cli, cli_cache, tmp_path, mode: str) -> dict:
    """``check`` of the tiny model in self-draft ``mode`` at three tokens a step: it must pass with the
    draft on the megakernel; returns the Mirage side of check.json."""
    prompts = prompts_file(tmp_path / "prompts.txt", 8)
    proc = run_cli("check", "--model", "tiny", "--max-tokens", "9", "--cache-dir", str(cli_cache),
                   "--mode", mode, "--tokens-per-step", "3", "--prompts", prompts, "--output", str(tmp_path))
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    assert f"Mirage applied: {mode}, draft model megakernel" in proc.stdout and "Verdict: PASS" in proc.stdout
    mirage = json.loads((tmp_path / "check.json").read_text())["sides"]["mirage"]
    assert mirage["mirage_status"]["draft"]["megakernel_steps"] > 0
    return mirage


def test_check_tiny_multi_token(run_cli, cli_cache, tmp_path):
    """--mode multi-token: the model drafts two tokens per step for itself on the megakernel; the verify
    passes keep stock's tokens (float32) and accept every draft."""
    mirage = _check_self_draft(run_cli, cli_cache, tmp_path, "multi-token")
    assert mirage["engine"]["args"]["speculative_config"]["num_speculative_tokens"] == 2
    spec = mirage["speculative"]
    assert spec["acceptance_rate"] == 1.0 and spec["tokens_per_step"] == 3.0, spec


def test_check_tiny_multi_token_eagle(run_cli, cli_cache, tmp_path):
    """--mode multi-token-eagle: the same self-draft through vLLM's EAGLE speculator (models/self_draft.py),
    exact: the draft reads the target's KV cache, and in float32 every draft is accepted."""
    mirage = _check_self_draft(run_cli, cli_cache, tmp_path, "multi-token-eagle")
    assert mirage["engine"]["args"]["speculative_config"]["method"] == "eagle"
    assert mirage["mirage_status"]["draft"]["draft_reads_target_cache"] is True
    assert mirage["speculative"]["acceptance_rate"] == 1, mirage["speculative"]


def test_check_megakernel_fails_when_no_step_reached_it(run_cli, cli_cache, tmp_path):
    # Twenty requests decode as one batch, over the megakernel's 16: the fused layers serve every step.
    prompts = prompts_file(tmp_path / "prompts.txt", 20)
    proc = run_cli("check", "--model", "tiny", "--max-tokens", "4", "--cache-dir", str(cli_cache), "--mode", "megakernel",
                   "--prompts", prompts, "--skip-baseline")
    assert proc.returncode == EXIT_NOT_APPLIED, proc.stdout + proc.stderr
    assert clean_error(proc) == (
        "vllm-mirage: Mirage applied: megakernel, 2 fused decoder layers, 0 decode steps through the megakernel "
        "task graph: the megakernel ran no decode step (decode batch of 20 > 16)"
    )


def test_non_qwen3_model_says_mirage_did_not_apply(run_cli, tiny_llama, tmp_path):
    proc = run_cli("check", "--model", str(tiny_llama), "--skip-baseline", "--max-tokens", "2",
                   "--max-model-len", "256")
    assert proc.returncode == EXIT_NOT_APPLICABLE, proc.stdout + proc.stderr
    assert clean_error(proc).startswith("vllm-mirage: Mirage did not apply: ")
    assert "LlamaForCausalLM" in proc.stdout


def test_engine_failure_is_one_classified_line(run_cli, tmp_path):
    # An architecture neither transformers nor vLLM knows: the child fails while building its config.
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NopeForCausalLM"], "model_type": "nope"}))
    proc = run_cli("check", "--model", str(tmp_path), "--skip-baseline")
    assert proc.returncode == EXIT_ENGINE
    last = clean_error(proc)
    assert last.startswith("vllm-mirage: error: mirage side: engine failed: ") and "nope" in last
    assert "mirage.log" in last

import subprocess
import sys

import pytest

from vllm_mirage.cli.errors import EXIT_USAGE
from vllm_mirage.cli.main import build_parser, main


def test_bench_arguments():
    args = build_parser().parse_args([
        "bench", "--model", "qwen3-8b", "--batch-sizes", "1", "8", "64", "--num-warmup", "0",
        "--num-iterations", "3", "--baseline-args", "{}", '{"async_scheduling": true}',
        "--mirage-args", "{}", "--profile-gpu", "--max-model-len", "4096", "--gpu-memory-utilization", "0.5",
    ])
    assert args.func == "bench"
    assert args.batch_sizes == [1, 8, 64]
    assert args.num_warmup == 0 and args.num_iterations == 3
    assert args.baseline_args == ["{}", '{"async_scheduling": true}']
    assert args.profile_gpu and args.max_model_len == 4096 and args.gpu_memory_utilization == 0.5
    assert args.mode == ["fused"]
    assert build_parser().parse_args(["bench", "--mode", "fused", "megakernel"]).mode == ["fused", "megakernel"]


def test_check_arguments_and_defaults():
    args = build_parser().parse_args(["check", "--skip-baseline", "--tolerance", "0.1"])
    assert args.mode == "fused"  # check compares one Mirage side
    assert args.func == "check" and args.skip_baseline and args.tolerance == 0.1
    # Unset means "pick for the device" (see context.defaults), not a fixed number.
    assert args.model is None and args.max_tokens is None and args.dtype is None
    assert args.gpu_memory_utilization == 0.85
    assert args.logprobs is None  # check.TOP_LOGPROBS


def test_check_control_run_sets_stock_on_both_sides():
    from vllm_mirage.cli.context import switch_for

    args = build_parser().parse_args(["check", "--mode", "stock", "--mirage-args", '{"max_num_seqs": 4}', "--logprobs", "8"])
    assert (args.mode, args.logprobs) == ("stock", 8)
    assert [switch_for(m) for m in ("stock", "fused", "megakernel")] == ["0", "1", "megakernel"]


def test_multi_token_mode_drafts_with_the_model_itself(cli_cache):
    from vllm_mirage.cli.context import prepare, runner_spec, switch_for

    args = build_parser().parse_args(["check", "--mode", "multi-token", "--tokens-per-step", "5", "--model", "tiny",
                                      "--cache-dir", str(cli_cache)])
    ctx = prepare(args, "check")
    mirage, stock = runner_spec(ctx, "check", "mirage"), runner_spec(ctx, "check", "stock")
    assert switch_for("multi-token") == mirage["mirage_switch"] == "megakernel"
    assert mirage["engine_args"]["speculative_config"] == {
        "method": "draft_model", "model": ctx.model.model, "num_speculative_tokens": 4}
    assert "speculative_config" not in stock["engine_args"]  # stock decodes one token per step
    assert build_parser().parse_args(["bench", "--mode", "megakernel", "multi-token"]).tokens_per_step == [4]
    eagle = runner_spec(ctx, "check", "mirage", mirage_mode="multi-token-eagle")
    assert eagle["mirage_switch"] == "megakernel" and eagle["engine_args"]["speculative_config"] == {
        "method": "eagle", "model": ctx.model.model, "num_speculative_tokens": 4}


def test_bench_runs_a_multi_token_side_per_tokens_per_step():
    from vllm_mirage.cli.bench import mirage_variants, side_label
    from vllm_mirage.cli.errors import CliError

    assert build_parser().parse_args(["bench", "--tokens-per-step", "2", "4"]).tokens_per_step == [2, 4]
    variants = mirage_variants(["stock", "megakernel", "multi-token-eagle"], [2, 4, 2])
    assert variants == [("stock", None), ("megakernel", None), ("multi-token-eagle", 2), ("multi-token-eagle", 4)]
    assert [side_label(*v, variants) for v in variants] == [
        "control", "mirage[megakernel]", "mirage[multi-token-eagle, 2 tokens]", "mirage[multi-token-eagle, 4 tokens]"]
    one = mirage_variants(["multi-token-eagle"], [3])
    assert one == [("multi-token-eagle", 3)] and side_label(*one[0], one) == "mirage"
    with pytest.raises(CliError, match="several --tokens-per-step need a multi-token --mode"):
        mirage_variants(["fused", "megakernel"], [2, 3])


def test_bench_takes_stock_as_a_control_mode():
    args = build_parser().parse_args(["bench", "--mode", "stock", "megakernel", "--interleave"])
    assert args.mode == ["stock", "megakernel"]


@pytest.mark.parametrize("argv", [[], ["bench", "--batch-sizes", "one"], ["serve"], ["check", "--mode", "fused", "megakernel"],
                                  ["bench", "--mode", "turbo"], ["check", "--mode", "stock", "fused"],
                                  ["check", "--tokens-per-step", "3", "4"]])
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2


def test_parent_never_imports_vllm_or_torch():
    # Fast --help, and a parent process that never touches the GPU.
    code = (
        "import sys\n"
        "from vllm_mirage.cli import main, check, bench, launch, report, context, stats, status\n"
        "heavy = sorted(m for m in ('vllm', 'torch', 'matplotlib') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("vllm-mirage: error: ")
    return last


def test_invalid_switch_in_environment(monkeypatch, capsys):
    monkeypatch.setenv("VLLM_USE_MIRAGE", "yes")
    assert main(["check", "--model", "tiny"]) == EXIT_USAGE
    assert "VLLM_USE_MIRAGE='yes' is not valid" in _one_line_error(capsys)


def test_invalid_engine_args_json(cli_cache, capsys, monkeypatch):
    monkeypatch.delenv("VLLM_USE_MIRAGE", raising=False)
    argv = ["bench", "--model", "tiny", "--cache-dir", str(cli_cache), "--engine-args", "{not json"]
    assert main(argv) == EXIT_USAGE
    assert "--engine-args is not valid JSON" in _one_line_error(capsys)
    assert main([*argv[:-1], "[1, 2]"]) == EXIT_USAGE
    assert "must be a JSON object" in _one_line_error(capsys)
    check = ["check", "--model", "tiny", "--cache-dir", str(cli_cache), "--mirage-args", "{}"]
    assert main([*check, "--baseline-args", "[1]"]) == EXIT_USAGE
    assert "--baseline-args must be a JSON object" in _one_line_error(capsys)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "qwen3-7b"], "unknown model 'qwen3-7b'"),
        (["--model", "./no/such/dir"], "model directory not found"),
        (["--prompts", "/no/such/prompts.txt"], "prompts file not found"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--tokens-per-step", "1"], "--tokens-per-step must be at least 2"),
    ],
)
def test_usage_errors_are_one_line(extra, message, cli_cache, capsys, monkeypatch):
    monkeypatch.delenv("VLLM_USE_MIRAGE", raising=False)
    argv = ["check", "--model", "tiny", "--cache-dir", str(cli_cache), *extra]
    assert main(argv) == EXIT_USAGE
    assert message in _one_line_error(capsys)


def test_empty_prompts_file(tmp_path, cli_cache, capsys, monkeypatch):
    monkeypatch.delenv("VLLM_USE_MIRAGE", raising=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n   \n")
    assert main(["bench", "--model", "tiny", "--cache-dir", str(cli_cache), "--prompts", str(empty)]) == EXIT_USAGE
    assert "has no prompts" in _one_line_error(capsys)


def test_bench_needs_at_least_one_start(cli_cache, capsys, monkeypatch):
    monkeypatch.delenv("VLLM_USE_MIRAGE", raising=False)
    assert main(["bench", "--model", "tiny", "--cache-dir", str(cli_cache), "--starts", "0"]) == EXIT_USAGE
    assert "--starts >= 1" in _one_line_error(capsys)


def test_bench_token_counts_are_checked_before_any_engine(cli_cache, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_USE_MIRAGE", raising=False)
    monkeypatch.chdir(tmp_path)  # no output folder is made for a refused command
    bench = ["bench", "--model", "tiny", "--cache-dir", str(cli_cache)]
    assert main([*bench, "--mode", "multi-token-eagle", "--tokens-per-step", "3", "1"]) == EXIT_USAGE
    assert "--tokens-per-step must be at least 2" in _one_line_error(capsys)
    assert main([*bench, "--mode", "fused", "--tokens-per-step", "2", "3"]) == EXIT_USAGE
    assert "several --tokens-per-step need a multi-token --mode" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []

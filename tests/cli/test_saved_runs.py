"""``bench --resume``: a stopped bench goes on from the engine runs it saved, and reuses none that measured
something else. The engines are replaced by a stand-in that records what it was asked to run."""

import json

import pytest

from vllm_mirage.cli import bench, context
from vllm_mirage.cli.launch import SideRun
from vllm_mirage.cli.main import build_parser
from vllm_mirage.cli.saved_runs import SavedRuns, package_source_hash


class Engines:
    """Stands in for ``run_side``: each call is one engine start, with made-up timings that say which
    call produced them (the step time is the call's number in ms)."""

    def __init__(self, stop_after: int | None = None):
        self.calls: list[tuple[str, int, bool]] = []
        self.stop_after = stop_after

    def __call__(self, run: SideRun, workdir, log_dir, on_cuda, verbose):
        if self.stop_after is not None and len(self.calls) == self.stop_after:
            raise KeyboardInterrupt  # the command is stopped (a timeout's SIGTERM arrives as this)
        self.calls.append((run.label, run.start, run.spec["profile_gpu"]))
        step = len(self.calls) * 1e-3
        tokens = run.spec["max_tokens"]
        timings = {
            str(bs): {"first_token_s": [0.01] * 2, "total_s": [0.01 + step * (tokens - 1)] * 2,
                      "output_tokens": [bs * tokens] * 2}
            for bs in run.spec["batch_sizes"]
        }
        mirage = run.side == "mirage"
        return {
            "side": run.side, "label": run.label, "system": {"device": "cpu"}, "log": None,
            "engine": {"dtype": "float32", "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                       "init_seconds": 1.0},
            "prompt_tokens": [4], "truncated_prompts": 0, "timings": timings,
            "mirage_status": {"mode": "fused", "fused_layers": 2} if mirage else None,
        }


@pytest.fixture
def bench_cmd(cli_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(context, "has_cuda_gpu", lambda: False)
    monkeypatch.delenv("VLLM_MIRAGE_PLAN", raising=False)
    out = tmp_path / "out"

    def run(engines: Engines, *extra: str) -> dict:
        monkeypatch.setattr(bench, "run_side", engines)
        args = build_parser().parse_args(
            ["bench", "--cache-dir", str(cli_cache), "--batch-sizes", "1", "--max-tokens", "4",
             "--num-warmup", "0", "--num-iterations", "2", "--starts", "2", "--output", str(out), *extra])
        assert bench.run_bench(args) == 0
        return json.loads((out / "results.json").read_text())

    return run


def test_resume_reuses_the_runs_a_stopped_bench_saved(bench_cmd):
    with pytest.raises(KeyboardInterrupt):
        bench_cmd(Engines(stop_after=3))  # stock, Mirage, stock of start 2 — then stopped
    engines = Engines()
    results = bench_cmd(engines, "--resume")
    assert engines.calls == [("mirage", 1, False)]  # only the run that never finished
    assert any("3 engine run(s) reused" in n for n in results["notes"])
    # The pooled figures are of the saved runs (steps 1 and 3 ms on the stock side) and the new one.
    starts = results["sides"]["stock"]["starts"]
    assert [s["1"]["total_s"][0] for s in starts] == pytest.approx([0.013, 0.019])


def test_only_the_first_start_is_profiled(bench_cmd):
    engines = Engines()
    results = bench_cmd(engines, "--profile-gpu")
    assert engines.calls == [("stock", 0, True), ("mirage", 0, True), ("stock", 1, False), ("mirage", 1, False)]
    assert results["settings"]["gpu_profiled_starts"] == 1


def test_without_resume_or_with_other_settings_everything_runs_again(bench_cmd):
    bench_cmd(Engines())
    again = Engines()
    bench_cmd(again)  # no --resume: measured again
    assert len(again.calls) == 4
    other = Engines()
    bench_cmd(other, "--resume", "--num-iterations", "3")  # saved runs measured something else
    assert len(other.calls) == 4
    same = Engines()
    results = bench_cmd(same, "--resume", "--num-iterations", "3")
    assert same.calls == [] and any("4 engine run(s) reused" in n for n in results["notes"])


def test_an_interleaved_start_is_reused_whole_or_measured_again(bench_cmd, monkeypatch, tmp_path):
    """Sides timed in turn are compared pair by pair: a start saved in part is measured again, all sides."""
    engines = Engines()

    def interleaved(runs, workdir, log_dir, on_cuda, verbose, *timing):
        assert all(run.spec["interleave"] for run in runs)
        return [dict(engines(run, workdir, log_dir, on_cuda, verbose), interleaved_with=[r.label for r in runs])
                for run in runs]

    monkeypatch.setattr(bench, "run_interleaved", interleaved)
    bench_cmd(Engines(), "--interleave")
    # the second start brings its engines up in the other order (bench.launch_order)
    assert engines.calls == [("stock", 0, False), ("mirage", 0, False), ("mirage", 1, False), ("stock", 1, False)]
    engines.calls.clear()
    (tmp_path / "out" / "runs" / "mirage-start2.json").unlink()
    results = bench_cmd(Engines(), "--interleave", "--resume")
    assert engines.calls == [("mirage", 1, False), ("stock", 1, False)]
    assert any("2 engine run(s) reused" in n and "(stock-start1.json, mirage-start1.json)" in n
               for n in results["notes"])
    assert results["rows"][0]["paired"]["pairs"] == 4


def _run(spec_extra=None, start=0) -> SideRun:
    spec = {"mode": "bench", "side": "mirage", "max_tokens": 4, "profile_gpu": True, "profile_dir": "/tmp/a",
            **(spec_extra or {})}
    return SideRun("mirage", "mirage[fused]", spec, steps=1, start=start)


def test_the_key_covers_what_decides_a_measurement(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_MIRAGE_PLAN", raising=False)
    saved = SavedRuns(tmp_path, gpu="NVIDIA H200")
    key = saved.key(_run())
    assert saved.key(_run({"profile_dir": "/elsewhere"})) == key  # where traces go is not what is measured
    assert saved.key(_run({"max_tokens": 8})) != key
    assert saved.key(_run(start=1)) != key
    assert SavedRuns(tmp_path, gpu="NVIDIA H100 80GB HBM3").key(_run()) != key
    plan = tmp_path / "plan.json"
    plan.write_text('{"fused_max_tokens": 16}')
    monkeypatch.setenv("VLLM_MIRAGE_PLAN", str(plan))
    assert SavedRuns(tmp_path, gpu="NVIDIA H200").key(_run()) != key


def test_a_changed_source_file_changes_the_key(tmp_path, monkeypatch):
    import vllm_mirage

    package = tmp_path / "vllm_mirage"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    kernel = package / "ops" / "kernel.py"
    kernel.write_text("BLOCK = 64\n")
    monkeypatch.setattr(vllm_mirage, "__file__", str(package / "__init__.py"))
    before = package_source_hash()
    kernel.write_text("BLOCK = 128\n")
    assert package_source_hash() != before


def test_a_corrupt_or_foreign_file_is_not_reused(tmp_path):
    saved = SavedRuns(tmp_path, gpu=None)
    run = _run()
    saved.save(run, {"timings": {}})
    assert saved.load(run) == {"timings": {}}
    saved.path(run).write_text("{not json")
    assert saved.load(run) is None
    saved.path(run).write_text(json.dumps({"key": "another", "result": {"timings": {}}}))
    assert saved.load(run) is None


def test_interleaved_engines_share_the_gpu_memory(cli_cache, tmp_path, monkeypatch):
    """On a GPU every side's engine is alive at once: each asks for its share of --gpu-memory-utilization."""
    monkeypatch.setattr(context, "has_cuda_gpu", lambda: True)
    monkeypatch.setattr(bench, "nvidia_smi", lambda what: "NVIDIA H200")
    engines, specs = Engines(), []

    def interleaved(runs, workdir, log_dir, on_cuda, verbose, *timing):
        specs.extend(run.spec for run in runs)
        return [dict(engines(run, workdir, log_dir, on_cuda, verbose), interleaved_with=[]) for run in runs]

    monkeypatch.setattr(bench, "run_interleaved", interleaved)
    args = build_parser().parse_args(
        ["bench", "--cache-dir", str(cli_cache), "--model", "tiny", "--batch-sizes", "1", "--max-tokens", "4",
         "--num-warmup", "0", "--num-iterations", "1", "--baseline-args", "{}", '{"async_scheduling": true}',
         "--interleave",
         "--output", str(tmp_path / "out")])
    assert bench.run_bench(args) == 0
    assert [s["engine_args"]["gpu_memory_utilization"] for s in specs] == [round(0.85 / 3, 3)] * 3

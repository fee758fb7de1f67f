"""BENCHMARKS.md is generated from the committed result files, and reads new result folders."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from tests.benchmarks import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def summarize(tmp_path, monkeypatch):
    """The script, reading result folders under ``tmp_path/benchmarks/results`` instead of the repository's."""
    script = load_script("summarize")
    monkeypatch.setattr(script, "ROOT", tmp_path)
    monkeypatch.setattr(script, "RESULTS", tmp_path / "benchmarks" / "results")
    return script


def _bench_result(summarize, source: str, folder: str, change=lambda data: None) -> Path:
    """The committed bench file of ``source`` (``<gpu>/<folder>``), after ``change(data)``, written to the
    script's temporary results tree as ``folder``; returns that folder."""
    data = json.loads((ROOT / "benchmarks" / "results" / source / "results.json").read_text())
    change(data)
    new = summarize.RESULTS / folder
    new.mkdir(parents=True)
    (new / "results.json").write_text(json.dumps(data))
    return new


def test_benchmarks_md_is_what_the_result_files_give():
    assert load_script("summarize").render() == (ROOT / "BENCHMARKS.md").read_text(), (
        "BENCHMARKS.md is stale: run python benchmarks/summarize.py"
    )


def test_a_new_result_folder_gets_its_date_command_and_group(summarize):
    old = "h100/2026-11-24-bench-8b-b1-megakernel"

    def on_h200_undated(data):
        del data["created"]  # no date in the file: the folder's
        data["system"]["gpu"] = "NVIDIA H200"
        for side in data["sides"].values():
            side["timings"]["1"]["total_s"] = [t + 0.127 for t in side["timings"]["1"]["first_token_s"]]

    new = _bench_result(summarize, old, "h200/2026-12-02-bench-8b-b1-megakernel", on_h200_undated)
    command = "MODE=megakernel BATCHES=1 \\\n  bash benchmarks/e2e_device.sh bench qwen3-8b OUT\n"
    (new / "command.txt").write_text(command)
    shutil.copytree(ROOT / "benchmarks" / "results" / old, summarize.RESULTS / old)

    text = summarize.render()
    link = "[bench-8b-b1-megakernel](benchmarks/results/h200/2026-12-02-bench-8b-b1-megakernel/)"
    # Every side decodes 127 steps in 0.127 s: 1 ms a step on both, so 1.00x.
    assert f"| 2026-12-02 | {link} | megakernel | qwen3-8b | 1 | 1.00 / 1.00 | 1.00× |" in text
    assert f"- {link} (2026-12-02), [plot]" not in text  # no plot.png in the new folder
    folded = "MODE=megakernel BATCHES=1 bash benchmarks/e2e_device.sh bench qwen3-8b OUT"  # one line
    assert f"- {link} (2026-12-02): `{folded}`" in text
    h100 = text.index("### NVIDIA H100 80GB HBM3, vLLM 0.26.0 (`h100/`)")
    h200 = text.index("### NVIDIA H200, vLLM 0.26.0 (`h200/`)")
    assert h100 < h200 < text.index("## Same tokens?")
    assert summarize.render() == text  # deterministic


def test_a_serving_soak_gets_a_row_per_mode_with_its_notes_after_the_command(summarize):
    folder = summarize.RESULTS / "h200" / "2026-12-03-serve-soak-tiny"
    folder.mkdir(parents=True)
    mode = {"requests_per_burst": 4, "errors": 0, "ttft_median_s": 0.02, "tpot_median_s": 0.005,
            "same_text_across_bursts": 4, "memory_growth_mib": 0.0}
    soak = {"gpu": "NVIDIA H200",
            "modes": {m: {"vllm": "0.26.0", "bursts": [{}, {}]} for m in ("stock", "megakernel")},
            "summary": {"stock": {**mode, "output_tokens_per_s": 100.0},
                        "megakernel": {**mode, "output_tokens_per_s": 150.0, "same_text_as_stock": [4, 3]}}}
    (folder / "soak.json").write_text(json.dumps(soak))
    (folder / "command.txt").write_text("VLLM_MIRAGE_PLAN=plan.json python benchmarks/serve_soak.py \\\n"
                                        "  --out OUT/soak.json\n# plan.json: every path up to batch 16.\n")

    text = summarize.render()
    link = "[serve-soak-tiny](benchmarks/results/h200/2026-12-03-serve-soak-tiny/)"
    assert "### NVIDIA H200, vLLM 0.26.0 (`h200/`)" in text
    assert f"| 2026-12-03 | {link} | stock | 4 × 2 | 0 | 100 | 1.00× | 20.00 | 5.00 | 4/4 | n/a | 0 |" in text
    assert f"| 2026-12-03 | {link} | megakernel | 4 × 2 | 0 | 150 | 1.50× | 20.00 | 5.00 | 4/4 | 4 and 3 | 0 |" in text
    command = "VLLM_MIRAGE_PLAN=plan.json python benchmarks/serve_soak.py --out OUT/soak.json"
    assert f"- {link} (2026-12-03): `{command}` plan.json: every path up to batch 16." in text


def test_a_check_with_a_control_shows_it_beside_mirage(summarize):
    old = ROOT / "benchmarks" / "results" / "h200" / "2026-12-02-check-random-0.6b-fused" / "check.json.gz"
    folder = summarize.RESULTS / "h200" / "2026-12-03-check-controlled"
    folder.mkdir(parents=True)
    data = summarize._read_json(old)
    control = {**data["comparison"], "logprobs": {**data["comparison"]["logprobs"], "mean_diff": 0.01, "max_diff": 0.5}}
    data["control"] = {"engine_args": {"max_num_seqs": 8}, "comparison": control}
    (folder / "check.json.gz").write_bytes(gzip.compress(json.dumps(data).encode()))  # as large checks are kept
    row = next(line for line in summarize.render().splitlines() if "check-controlled" in line and line.startswith("|"))
    assert row.endswith("| 0.16 / 1.1 (top 5) | 0.01 / 0.5 (top 5) |")


def test_a_single_control_side_is_named_stock(summarize):
    """bench --mode stock alone: the side is labelled "control" and its rows name their mode "stock"."""

    def control_on_h200(data):
        data["system"]["gpu"] = "NVIDIA H200"
        data["sides"]["control"] = data["sides"].pop("mirage")
        data.update(mirage_mode="stock", mirage_label="control")

    _bench_result(summarize, "h100/2026-11-24-bench-8b-b1-megakernel", "h200/2026-12-05-bench-8b-stock-control",
                  control_on_h200)
    link = "[bench-8b-stock-control](benchmarks/results/h200/2026-12-05-bench-8b-stock-control/)"
    assert f"| {link} | stock | qwen3-8b | 1 |" in summarize.render()


def test_multi_token_sides_are_named_with_their_tokens_per_step(summarize):
    """bench --tokens-per-step 2 4: one row per side and batch, each naming its tokens a step."""

    def two_token_counts(data):
        side = data["sides"].pop("mirage")
        data["modes"] = []
        for tokens in (2, 4):
            label = f"mirage[multi-token-eagle, {tokens} tokens]"
            data["sides"][label] = side
            data["modes"].append({"mode": "multi-token-eagle", "tokens_per_step": tokens, "label": label})

    _bench_result(summarize, "h200/2026-12-04-bench-1.7b-self-draft-verify-rows",
                  "h200/2026-12-05-bench-0.6b-tokens-per-step", two_token_counts)
    link = "[bench-0.6b-tokens-per-step](benchmarks/results/h200/2026-12-05-bench-0.6b-tokens-per-step/)"
    text = summarize.render()
    for tokens in (2, 4):
        assert f"| {link} | multi-token-eagle, {tokens} tokens a step | random:qwen3-1.7b | 1 |" in text


def test_the_never_slower_grid_takes_shipped_plan_points_and_marks_stock_code(summarize):
    """Only interleaved benches of the shipped plan on dummy weights fill the grid; a point above the
    plan's limits (stock's layers on the Mirage side too) is marked."""

    def not_interleaved(data):  # as if run without --interleave: no paired ratios, no grid point
        for side in data["sides"].values():
            side["interleaved_with"] = None

    for name in ("h200/2026-12-04-bench-8b-shipped-b16-b64", "h200/2026-12-04-bench-1.7b-self-draft-verify-rows"):
        _bench_result(summarize, name, name)
    _bench_result(summarize, "h200/2026-12-04-bench-8b-shipped-b1-b8", "h200/2026-12-04-bench-8b-shipped-b1-b8",
                  not_interleaved)
    grid = summarize.render().split("## Never slower")[1].split("\n## ")[0]
    rows = [line for line in grid.splitlines() if line.startswith("| NVIDIA H200")]
    assert [row.split(" | ")[1:3] for row in rows] == [["qwen3-8b", "fused"], ["qwen3-8b", "megakernel"]]
    fused = rows[0].split(" | ")
    assert fused[3:7] == ["—"] * 4  # batch 1-8: only in the file that was not interleaved
    assert fused[7].startswith("1.00 (0.96–1.03)°<br>TTFT ")
    assert "random:" not in grid  # the self-draft's random checkpoint is not a shipped-plan point


def test_the_grid_puts_the_stock_control_beside_the_mirage_rows_unmarked(summarize):
    """A bench with ``--mode stock`` gives the grid a "stock (control)" row: stock against stock, the
    yardstick, not a point where the plan fell back (no °)."""
    name = "h200/2026-12-04-bench-8b-control-b8-b64"
    _bench_result(summarize, name, name)
    grid = summarize.render().split("## Never slower")[1].split("\n## ")[0]
    rows = {row.split(" | ")[2]: row.split(" | ") for row in grid.splitlines() if row.startswith("| NVIDIA H200")}
    assert list(rows) == ["megakernel", "stock (control)"]
    control, megakernel = rows["stock (control)"], rows["megakernel"]
    assert control[3:6] == ["—"] * 3  # batch 1-4 not run
    assert control[6].startswith("0.98 (0.97–0.99)<br>TTFT ")  # batch 8
    assert "°" not in "".join(control[3:10])
    assert megakernel[6].startswith("1.00 (0.97–1.00)<br>")  # within its limit: no mark
    assert megakernel[7].startswith("0.99 (0.97–1.00)°<br>")  # batch 16: stock's layers


def test_a_point_runs_the_code_the_plan_gives_its_batch():
    s = load_script("summarize")
    status = {"mode": "megakernel", "megakernel_max_batch": 8, "fused_max_tokens": 2}
    assert [s._code(status, {"batch_size": b}) for b in (1, 8, 16)] == ["megakernel", "megakernel", "stock"]
    fused = {"mode": "fused", "megakernel_max_batch": 0, "fused_max_tokens": 2}
    assert [s._code(fused, {"batch_size": b}) for b in (2, 4)] == ["fused", "stock"]

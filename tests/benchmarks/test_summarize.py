"""BENCHMARKS.md is generated from the committed result files, and reads new result folders."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _summarize():
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_benchmarks_md_is_what_the_result_files_give():
    assert _summarize().render() == (ROOT / "BENCHMARKS.md").read_text(), (
        "BENCHMARKS.md is stale: run python benchmarks/summarize.py"
    )


def test_a_new_result_folder_gets_its_date_command_and_group(tmp_path, monkeypatch):
    s = _summarize()
    results = tmp_path / "benchmarks" / "results"
    old = ROOT / "benchmarks" / "results" / "h100" / "2026-11-24-bench-8b-b1-megakernel" / "results.json"
    new = results / "h200" / "2026-12-02-bench-8b-b1-megakernel"
    new.mkdir(parents=True)
    data = json.loads(old.read_text())
    del data["created"]  # no date in the file: the folder's
    data["system"]["gpu"] = "NVIDIA H200"
    for side in data["sides"].values():
        side["timings"]["1"]["total_s"] = [t + 0.127 for t in side["timings"]["1"]["first_token_s"]]
    (new / "results.json").write_text(json.dumps(data))
    command = "MODE=megakernel BATCHES=1 \\\n  bash benchmarks/e2e_device.sh bench qwen3-8b OUT\n"
    (new / "command.txt").write_text(command)
    shutil.copytree(old.parent, results / "h100" / old.parent.name)
    monkeypatch.setattr(s, "ROOT", tmp_path)
    monkeypatch.setattr(s, "RESULTS", results)

    text = s.render()
    link = "[bench-8b-b1-megakernel](benchmarks/results/h200/2026-12-02-bench-8b-b1-megakernel/)"
    # Every side decodes 127 steps in 0.127 s: 1 ms a step on both, so 1.00x.
    assert f"| 2026-12-02 | {link} | megakernel | qwen3-8b | 1 | 1.00 / 1.00 | 1.00× |" in text
    assert f"- {link} (2026-12-02), [plot]" not in text  # no plot.png in the new folder
    folded = "MODE=megakernel BATCHES=1 bash benchmarks/e2e_device.sh bench qwen3-8b OUT"  # one line
    assert f"- {link} (2026-12-02): `{folded}`" in text
    h100 = text.index("### NVIDIA H100 80GB HBM3, vLLM 0.26.0 (`h100/`)")
    h200 = text.index("### NVIDIA H200, vLLM 0.26.0 (`h200/`)")
    assert h100 < h200 < text.index("## Same tokens?")
    assert s.render() == text  # deterministic

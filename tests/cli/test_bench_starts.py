"""Several engine starts of an interleaved bench: each start brings the sides' engines up in another order."""

import json

import pytest

from vllm_mirage.cli import bench
from vllm_mirage.cli.launch import SideRun
from vllm_mirage.cli.main import main


def _runs(*labels):
    return [SideRun("stock" if label == "stock" else "mirage", label, {}, 1) for label in labels]


def test_launch_order_puts_each_side_first_once_over_as_many_starts():
    runs = _runs("stock", "control", "mirage[fused]")
    orders = [[r.label for r in bench.launch_order(runs, start)] for start in range(4)]
    assert orders == [["stock", "control", "mirage[fused]"], ["control", "mirage[fused]", "stock"],
                      ["mirage[fused]", "stock", "control"], ["stock", "control", "mirage[fused]"]]


class _Stop(Exception):
    pass


def test_interleaved_starts_launch_rotated_and_keep_each_result_with_its_side(cli_cache, tmp_path, monkeypatch):
    """The engines of start 2 come up in the rotated order; what each returns is saved as its own side's,
    not as the side in the same position of the first start's order."""
    monkeypatch.delenv("VLLM_USE_MIRAGE", raising=False)
    launched = []

    def fake_run_interleaved(runs, *args):
        launched.append([r.label for r in runs])
        if len(launched) == 3:
            raise _Stop
        return [{"ok": True, "measured_as": r.label, "timings": {}} for r in runs]

    monkeypatch.setattr(bench, "run_interleaved", fake_run_interleaved)
    with pytest.raises(_Stop):
        main(["bench", "--model", "tiny", "--cache-dir", str(cli_cache), "--output", str(tmp_path),
              "--mode", "stock", "fused", "--interleave", "--starts", "3", "--batch-sizes", "1"])
    assert launched == [["stock", "control", "mirage[fused]"], ["control", "mirage[fused]", "stock"],
                        ["mirage[fused]", "stock", "control"]]
    for start in (1, 2):
        for label in ("stock", "control", "mirage-fused"):
            saved = json.loads((tmp_path / "runs" / f"{label}-start{start}.json").read_text())
            assert saved["result"]["measured_as"].replace("[", "-").rstrip("]") == label

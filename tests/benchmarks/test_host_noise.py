"""benchmarks/host_noise.py's summary: ratios within a condition and against the same round's default pair."""

import json
import subprocess
import sys

import pytest

from tests.benchmarks import ROOT, load_script

RESULT = ROOT / "benchmarks" / "results" / "h200" / "2026-12-04-host-noise-0.6b"


def _pair(step, in_call=None):
    return {"decode_ms": step, "in_call_ms": in_call or step, "stolen_jiffies": 1, "sm_mhz": 1980}


def test_spread_pairs_consecutive_steps_and_rounds():
    script = load_script("host_noise")
    pairs = {"default": [_pair(v) for v in (2.0, 1.0, 2.0, 1.0)],
             "pinned": [_pair(v) for v in (2.0, 2.0, 4.0, 2.0)]}
    summary = script.summarize(pairs)
    default, pinned = summary["default"]["decode_ms"], summary["pinned"]["decode_ms"]
    # consecutive pairs of a condition: 2/1 twice for the default; 2/2 and 4/2 for pinned
    assert default["pair_ratio_median_abs_log"] == pytest.approx(0.6931, abs=1e-4)
    assert default["to_default_p10"] == default["to_default_p90"] == 1.0
    # pinned against the same round's default: 1, 2, 2, 2
    assert pinned["median"] == 2.0 and pinned["to_default_median"] == 2.0
    assert pinned["to_default_p90"] == pytest.approx(2.0)
    assert summary["pinned"]["stolen_jiffies"] == 4 and summary["pinned"]["sm_mhz"] == [1980]


def test_the_committed_summary_is_what_the_saved_pairs_give():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_noise.py"), "--summarize",
                          str(RESULT / "noise.json")], capture_output=True, text=True, check=True).stdout
    assert out == (RESULT / "summary.txt").read_text()
    assert len(out.splitlines()) == 8  # batch 1 and 8, four conditions each
    assert json.loads(out.splitlines()[0].split(" ", 2)[2])["decode_ms"]["median"] > 0

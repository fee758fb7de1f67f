"""The arithmetic of the GPU benchmark tools, on CPU: floors, copy counts, the critical path."""

import json
from pathlib import Path

import pytest
import torch

from tests.benchmarks import load_script

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "h100"


@pytest.mark.parametrize("model", ["qwen3-0.6b", "qwen3-8b"])
def test_megakernel_floor_is_the_committed_one(model):
    # The floor a committed run reports is the step's bytes over the copy bandwidth it measured.
    bench = load_script("bench_megakernel")
    run = json.loads((RESULTS / "2026-11-24-megakernel-weight-streams" / f"stream_res_{model}_b1.json").read_text())
    row = run["rows"][0]
    nbytes = bench.step_bytes(bench.SHAPES[model], row["batch"], row["context"], row["lm_head"])
    assert 1e3 * nbytes / run["copy_bandwidth_bytes_per_s"] == pytest.approx(row["floor_ms"], rel=1e-9)
    assert row["fraction_of_floor"] == pytest.approx(row["floor_ms"] / row["step_ms"])


def test_megakernel_step_bytes_count_weights_and_cache():
    bench = load_script("bench_megakernel")
    cfg = dict(hidden=8, inter=16, hq=2, hkv=1, d=4, layers=3, vocab=100)
    qkv, o, mlp, norms = (2 + 2 * 1) * 4 * 8, 8 * 2 * 4, 3 * 16 * 8, 2 * 8 + 2 * 4
    weights = 3 * (qkv + o + mlp + norms) * 2  # bf16
    cache = 2 * 3 * 5 * 7 * 1 * 4 * 2  # k and v, layers, batch 5, context 7
    assert bench.step_bytes(cfg, 5, 7, lm_head=False) == weights + cache
    assert bench.step_bytes(cfg, 5, 7, lm_head=True) == weights + cache + 100 * 8 * 2


def test_critical_path_adds_up_to_the_step():
    bench = load_script("bench_megakernel")
    Task = bench.Task
    # Columns: start, end of wait, end of compute, 3, 4, stamp 5, stamp 6, stamp 7 (µs).
    t = torch.zeros(3, 8, dtype=torch.float64)
    t[0, :3], t[0, 6], t[0, 7] = torch.tensor([0.0, 0.0, 5.0]), 1.0, 4.0  # QKV tasks: rms, loop stamps
    t[1, :3], t[1, 6], t[1, 7] = torch.tensor([0.0, 0.0, 6.0]), 2.0, 5.0
    t[2, :3] = torch.tensor([1.0, 7.0, 9.0])  # ATTN, waiting when QKV ended at 6
    t[2, 6], t[2, 7], t[2, 5] = 8.0, 8.5, 8.8  # qk, attend, arrive
    path = bench.critical_path(t, {(0, Task.QKV): [0, 1], (0, Task.ATTN): [2]})
    assert path["QKV"] == {"rms": 2.0, "loop": 5.0, "done": 6.0}
    assert path["ATTN"] == {"handoff": 1.0, "qk": 2.0, "attend": 2.5, "arrive": 2.8, "done": 3.0}
    assert path["QKV"]["done"] + path["ATTN"]["done"] == t[:, 2].max().item()


def test_op_timing_outruns_l2():
    """bench_ops.py and the first-use tuner rotate weight copies so that each call reads HBM."""
    from vllm_mirage.tuning import timing

    for nbytes in (4096, 8 * 2**20, 201 * 2**20):
        copies = timing.copies_for(nbytes)
        assert copies >= 2 and (copies * nbytes >= 4 * timing.L2_BYTES or copies == 2)
        assert (copies - 1) * nbytes < 4 * timing.L2_BYTES or copies == 2  # no more copies than needed

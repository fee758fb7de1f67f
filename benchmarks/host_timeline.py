"""Where a decode step's wall time goes, host against GPU, from a torch-profiler trace of vLLM.

    python3 benchmarks/host_timeline.py TRACE.json.gz [TRACE ...] [--json OUT.json]

The profile that ``vllm-mirage bench --profile-gpu`` writes (one per side, ``profile-<side>/``) holds
the engine's CPU ops, CUDA runtime calls and GPU kernels on one clock. With async scheduling the host
prepares step N+1 while the GPU runs step N, so a decode step costs max(host, GPU) only if nothing makes
the host wait for the GPU in between. This reads, per pure-decode step (vLLM's ``execute_context_0(0)_
generation_B(B)`` ranges):

- ``period``: from one step's cudaGraphLaunch to the next (the wall time per step);
- ``gpu_busy``: kernel and copy time the GPU spent in that period;
- ``launch_lead``: how long before the GPU started the graph the host had launched it. Near zero, the
  GPU waited for the host; large, the host was ahead (GPU-bound);
- ``host_wait``: time in cudaEventSynchronize / cudaStreamSynchronize / cudaDeviceSynchronize, the host
  blocked on the GPU;
- the CPU ops that take the most time per step, by name (self time is not in the trace, so nested ops
  count in their parents too).

Medians over the steps; the first and last two steps of each generate call are left out.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

DECODE_RANGE = re.compile(r"execute_context_0\(0\)_generation_(\d+)\(\d+\)")
HOST_WAITS = ("cudaEventSynchronize", "cudaStreamSynchronize", "cudaDeviceSynchronize")
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f).get("traceEvents", []) if e.get("ph") == "X"]


def _overlap(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of sorted, merged ``intervals`` inside [lo, hi)."""
    i = bisect.bisect_left(intervals, (lo, lo)) - 1
    total = 0.0
    for a, b in intervals[max(i, 0):]:
        if a >= hi:
            break
        total += max(0.0, min(b, hi) - max(a, lo))
    return total


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def analyse(events: list[dict], top: int = 15) -> dict:
    cpu_ranges = sorted((e for e in events if e.get("cat") == "user_annotation"
                         and DECODE_RANGE.fullmatch(e.get("name", ""))), key=lambda e: e["ts"])
    launches = sorted((e for e in events if e.get("cat") == "cuda_runtime"
                       and e.get("name") == "cudaGraphLaunch"), key=lambda e: e["ts"])
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    busy = _merged([(e["ts"], e["ts"] + e.get("dur", 0)) for e in gpu])
    first_gpu = defaultdict(lambda: float("inf"))  # correlation id -> first kernel start
    for e in gpu:
        corr = e.get("args", {}).get("correlation")
        if corr is not None:
            first_gpu[corr] = min(first_gpu[corr], e["ts"])
    waits = sorted(((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                    if e.get("cat") == "cuda_runtime" and e.get("name") in HOST_WAITS))

    # One graph launch per decode step: the first inside each step's CPU range.
    starts = [e["ts"] for e in launches]
    steps = []
    for r in cpu_ranges:
        i = bisect.bisect_left(starts, r["ts"])
        if i < len(launches) and launches[i]["ts"] < r["ts"] + r.get("dur", 0):
            steps.append((r, launches[i]))
    # Consecutive steps of one generate call are less than 50 ms apart; trim each run's ends.
    runs, run = [], []
    for s in steps:
        if run and s[1]["ts"] - run[-1][1]["ts"] > 50_000:
            runs.append(run)
            run = []
        run.append(s)
    if run:
        runs.append(run)
    per = defaultdict(list)
    op_time: dict[str, float] = defaultdict(float)
    counted = 0
    for run in runs:
        for (r, launch), (_, nxt) in list(zip(run, run[1:]))[2:-2]:
            lo, hi = launch["ts"], nxt["ts"]
            per["period_us"].append(hi - lo)
            per["execute_model_us"].append(r.get("dur", 0))
            per["gpu_busy_us"].append(_overlap(busy, lo, hi))
            per["host_wait_us"].append(_overlap(waits, lo, hi))
            corr = launch.get("args", {}).get("correlation")
            if corr in first_gpu:
                per["launch_lead_us"].append(first_gpu[corr] - (launch["ts"] + launch.get("dur", 0)))
            per["graph_launch_cpu_us"].append(launch.get("dur", 0))
            counted += 1
    if counted:
        windows = [(run[2][1]["ts"], run[-3][1]["ts"]) for run in runs if len(run) > 5]
        for e in events:
            if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime", "python_function"):
                if any(lo <= e["ts"] < hi for lo, hi in windows):
                    op_time[e["name"]] += e.get("dur", 0)
    ops = sorted(((n, t / counted) for n, t in op_time.items()), key=lambda x: -x[1])[:top]
    return {
        "decode_steps": counted,
        "batch_sizes": sorted({int(DECODE_RANGE.fullmatch(r["name"]).group(1)) for r, _ in steps}),
        **{f"median_{k}": round(statistics.median(v), 1) for k, v in per.items()},
        "top_ops_us_per_step": [[n, round(t, 1)] for n, t in ops],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("traces", nargs="+", type=Path)
    p.add_argument("--json", type=Path, help="write the figures here too")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    out = {}
    for path in args.traces:
        out[str(path)] = figures = analyse(load_events(path), args.top)
        print(f"== {path}")
        for k, v in figures.items():
            if k != "top_ops_us_per_step":
                print(f"  {k}: {v}")
        for name, t in figures["top_ops_us_per_step"]:
            print(f"    {t:9.1f} us  {name[:100]}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where vLLM's decode loop spends its wall time, without a profiler: host phases and the GPU's span.

    python3 benchmarks/host_phases.py --model qwen3-0.6b --mirage megakernel --batch-sizes 1 2 --out X.json
    (add --multiprocessing for vLLM's default layout: the engine core in its own process)

Run it once per side (``--mirage off`` is stock vLLM with this package installed but switched off). The
torch profiler slows each CPU op and each CUDA-graph node (stock vLLM's graph launch takes ~0.85 ms
under it, the megakernel's one-kernel graph ~0.05 ms: ``host_timeline.py``), so profiled traces cannot
compare the two sides' host loops. Here the engine core's methods are wrapped, at class level before the
engine starts (a forked engine-core process inherits them), with ``time.perf_counter`` stamps and CUDA
events on the compute stream: about 10 µs per step in all.

Per decode step (the period from one ``execute_model`` to the next) it reports the host time in the
engine core's phases: ``schedule``; ``execute_model`` (input preparation and the graph launch);
``sample_tokens`` (the sampler's launches); the rest of ``step_fn``, mostly the wait for the previous
step's output; ``update_from_output``; and the time outside ``step_fn`` (the busy loop's queues with
multiprocessing, the front end's output handling without). The CUDA events give the GPU's span from
``execute_model`` to the end of ``sample_tokens``' work and its gap before the next step. ``gc_us`` is the
engine core's garbage-collector pauses, which overlap the other phases.

It also splits the bench's time to first token (the ``max_tokens=1`` call) along one clock: from
``generate()`` to the engine core's first stamp (``arrival``), the engine core's own span (``engine``, with
its phases' totals), and from its last stamp back to ``generate()``'s return (``return``).
``time.perf_counter`` is the system's monotonic clock on Linux, so a forked engine core's stamps compare.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

from vllm_mirage.cli.stats import percentile

PHASES_FILE = "HOST_PHASES_FILE"  # where the engine core appends one JSON line per finished run
_LOG: list = []  # (name, t0, t1, scheduled tokens), in the engine core's process
_EVENTS: list = []  # [start, end] CUDA events per execute_model call
OVERLAYS = ("step_fn", "gc")  # log entries that overlap the phases rather than sit beside them


def _timed(inner, name: str):
    def timed(self, *args, **kwargs):
        import torch

        if name == "execute_model":
            _EVENTS.append([torch.cuda.Event(enable_timing=True), None])
            _EVENTS[-1][0].record()
        t0 = time.perf_counter()
        out = inner(self, *args, **kwargs)
        t1 = time.perf_counter()
        if name == "sample_tokens" and _EVENTS:
            _EVENTS[-1][1] = torch.cuda.Event(enable_timing=True)
            _EVENTS[-1][1].record()
        tokens = getattr(args[0], "total_num_scheduled_tokens", None) if args else None
        _LOG.append((name, t0, t1, tokens))
        if name == "step_fn" and not self.scheduler.has_requests():
            _flush()
        return out

    return timed


def _gc_probe(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_probe.t0 = time.perf_counter()
    elif hasattr(_gc_probe, "t0"):
        _LOG.append(("gc", _gc_probe.t0, time.perf_counter(), None))


def install_probes() -> None:
    """Wrap the engine core's phases in this process's classes (before the engine is built)."""
    gc.callbacks.append(_gc_probe)
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    for cls, name in ((Scheduler, "schedule"), (Scheduler, "update_from_output"),
                      (UniProcExecutor, "execute_model"), (UniProcExecutor, "sample_tokens")):
        setattr(cls, name, _timed(getattr(cls, name), name))
    # step_fn is bound at start-up to one of these two; both log as "step_fn".
    for name in ("step", "step_with_batch_queue"):
        setattr(EngineCore, name, _timed(getattr(EngineCore, name), "step_fn"))


def _flush() -> None:
    import torch

    if not any(e[0] == "execute_model" for e in _LOG) or not os.environ.get(PHASES_FILE):
        _LOG.clear()  # a collection between runs, say: nothing of the engine's to write
        return
    torch.cuda.synchronize()
    line = {"phases": phases(_LOG, _EVENTS), "call": call_totals(_LOG, _EVENTS)}
    with open(os.environ[PHASES_FILE], "a") as f:
        f.write(json.dumps(line) + "\n")
    _LOG.clear()
    _EVENTS.clear()


def phases(log: list, events: list) -> dict[str, list[float]]:
    """Per-period figures (µs) of one run: lists, so that runs can be pooled before the medians."""
    execs = [e for e in log if e[0] == "execute_model"]
    counts = [e[3] for e in execs if e[3]]
    batch = min(counts, key=lambda n: (-counts.count(n), n)) if counts else None  # decode: the commonest
    decode = [i for i, e in enumerate(execs) if e[3] == batch]
    steps = [(t0, t1) for n, t0, t1, _ in log if n == "step_fn"]
    remainders = [(t0, (t1 - t0) - sum(b - a for n, a, b, _ in log if n not in OVERLAYS and t0 <= a < t1))
                  for t0, t1 in steps]
    per = defaultdict(list)
    for a, b in zip(decode, decode[1:]):
        if b != a + 1 or events[a][1] is None:
            continue
        lo, hi = execs[a][1], execs[b][1]
        per["period_us"].append((hi - lo) * 1e6)
        window = defaultdict(float)  # several calls of one kind within a period add up
        for name, t0, t1, _ in log:
            if lo <= t0 < hi and name != "step_fn":  # gc_us overlaps the others
                window[name] += t1 - t0
        for name, t in window.items():
            per[f"{name}_us"].append(t * 1e6)
        per["rest_of_step_fn_us"].append(sum(r for t0, r in remainders if lo <= t0 < hi) * 1e6)
        covered = sum(max(0.0, min(t1, hi) - max(t0, lo)) for t0, t1 in steps)
        per["outside_step_fn_us"].append(((hi - lo) - covered) * 1e6)
        (s0, e0), (s1, _) = events[a], events[b]
        per["gpu_span_us"].append(s0.elapsed_time(e0) * 1e3)
        per["gpu_gap_us"].append(e0.elapsed_time(s1) * 1e3)
    for i, e in enumerate(execs):  # prefill steps: the TTFT's host and GPU time
        if e[3] and e[3] != batch and events[i][1] is not None:
            per["prefill_execute_model_us"].append((e[2] - e[1]) * 1e6)
            per["prefill_gpu_span_us"].append(events[i][0].elapsed_time(events[i][1]) * 1e3)
    return dict(per)


def call_totals(log: list, events: list) -> dict:
    """One engine-core run in total: its first and last stamps (perf_counter seconds), the µs spent in
    each phase, and the GPU's span from the first ``execute_model`` to the last ``sample_tokens``."""
    totals = defaultdict(float)
    for name, t0, t1, _ in log:
        totals[f"{name}_us"] += (t1 - t0) * 1e6
    spans = [e for e in events if e[1] is not None]
    return {"first": min(e[1] for e in log), "last": max(e[2] for e in log),
            "steps": sum(e[0] == "step_fn" for e in log),
            "gpu_span_us": spans[0][0].elapsed_time(spans[-1][1]) * 1e3 if spans else 0.0, **totals}


def ttft_split(t0: float, t1: float, calls: list[dict]) -> dict[str, float]:
    """The max_tokens=1 call from ``generate()`` at ``t0`` to its return at ``t1``, µs, along the engine
    core's runs (``call_totals``) that began inside it. ``engine`` ends at the engine core's last stamp
    or at the return, whichever is first; the phase totals count whole runs."""
    first, last = min(c["first"] for c in calls), min(t1, max(c["last"] for c in calls))
    split = {"ttft_us": (t1 - t0) * 1e6, "arrival_us": (first - t0) * 1e6, "engine_us": (last - first) * 1e6,
             "return_us": (t1 - last) * 1e6}
    for c in calls:
        for k, v in c.items():
            if k.endswith("_us"):
                split[f"engine_{k}"] = split.get(f"engine_{k}", 0.0) + v
    split["engine_steps"] = sum(c["steps"] for c in calls)
    return split


def wall_steps(llm, prompts, max_tokens: int, iterations: int) -> dict:
    """The bench's method, (t(N tokens) - t(1 token)) / (N - 1), and the probes' phases of the N runs."""
    from vllm import SamplingParams

    one, full = (SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (1, max_tokens))
    out_file = Path(os.environ[PHASES_FILE])
    in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    steps = []
    pooled, ttft = defaultdict(list), defaultdict(list)
    for i in range(iterations + 1):  # the first is a warm-up
        out_file.write_text("")
        if in_process:  # the probes are this process's: each call's log starts here
            _LOG.clear()
            _EVENTS.clear()
        t0 = time.perf_counter()
        llm.generate(prompts, one, use_tqdm=False)
        t1 = time.perf_counter()
        if in_process:
            _flush()
        llm.generate(prompts, full, use_tqdm=False)
        t2 = time.perf_counter()
        if in_process:
            _flush()
        if not i:
            continue
        steps.append(((t2 - t1) - (t1 - t0)) / (max_tokens - 1) * 1e6)
        time.sleep(0.2)  # an engine-core process writes its line at its last step; let it land
        lines = [json.loads(line) for line in out_file.read_text().splitlines()]
        for line in lines:
            if line["call"]["first"] > t1:  # the max_tokens=N call's
                for k, v in line["phases"].items():
                    pooled[k].extend(v)
        # The engine core ends its last step after it has sent the token, maybe after generate() returned.
        first_calls = [line["call"] for line in lines if line["call"]["first"] < t1]
        for k, v in (ttft_split(t0, t1, first_calls) if first_calls else {}).items():
            ttft[k].append(v)
    figures = {"wall_step_us": [round(x, 1) for x in steps],
               "median_wall_step_us": round(statistics.median(steps), 1)}
    # Mean and spread, not only the median: the wall sees the mean, and a few long periods move it.
    figures.update({k: _spread(v) for k, v in pooled.items() if v})
    figures["periods"] = len(pooled["period_us"])
    figures["ttft"] = {k: _spread(v) for k, v in ttft.items()}
    return figures


def _spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 1),
            **{f"p{q}": round(percentile(values, q), 1) for q in (10, 50, 90)}, "max": round(max(values), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--mirage", default="off", help="VLLM_USE_MIRAGE for this process: off, 1, megakernel")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--engine-args", default='{"async_scheduling": true, "max_num_seqs": 16, '
                   '"compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16]}}')
    p.add_argument("--multiprocessing", action="store_true",
                   help="the engine core in its own (forked) process, as vLLM runs by default")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.multiprocessing else "0"
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"  # the probes live in this process's classes
    os.environ[PHASES_FILE] = str(args.out.with_suffix(".lines"))
    # A compile cache per side, as `vllm-mirage bench` keeps: before models/qwen3.py keyed its mode into
    # vLLM's cache key, the second side of a call ran the first side's compiled graph (NOTES, run 75).
    root = Path(os.environ.get("VLLM_CACHE_ROOT", Path.home() / ".cache" / "vllm"))
    os.environ["VLLM_CACHE_ROOT"] = str(root / f"host-phases-{args.mirage}")
    if args.mirage != "off":
        os.environ["VLLM_USE_MIRAGE"] = args.mirage
    from vllm import LLM

    from vllm_mirage.cli.models import resolve_model
    from vllm_mirage.cli.prompts import fallback_token_ids

    install_probes()
    model = resolve_model(args.model)
    llm = LLM(model=model.model, load_format=model.load_format, skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=2048, enable_prefix_caching=False, gpu_memory_utilization=0.85, seed=0,
              **json.loads(args.engine_args))
    text = "The quick brown fox jumps over the lazy dog. " * 3
    result = {"model": args.model, "mirage": args.mirage, "multiprocessing": args.multiprocessing,
              "engine_args": json.loads(args.engine_args), "batches": {}}
    for bs in args.batch_sizes:
        prompts = [{"prompt_token_ids": fallback_token_ids(text + str(i), 151936)} for i in range(bs)]
        result["batches"][bs] = fig = wall_steps(llm, prompts, args.max_tokens, args.iterations)
        print(f"{args.model} mirage={args.mirage} mp={int(args.multiprocessing)} b{bs}: "
              + ", ".join(f"{k} {v['mean'] if isinstance(v, dict) else v}" for k, v in fig.items()
                          if k not in ("wall_step_us", "ttft")) + " (phases: means)")
        print("  first token: " + ", ".join(f"{k} {v['p50']}" for k, v in fig["ttft"].items()) + " (medians)")
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

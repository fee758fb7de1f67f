"""Where the spread of a host-bound engine's wall time per decode step comes from.

    python3 benchmarks/host_noise.py MODEL OUT_JSON [ROUNDS]

One stock engine (async scheduling, no Mirage), batch 1 and 8. Each round times one pair (1 token, then
128) under each condition, in a rotating order, so every condition sees the same spells of the host:

- ``default``: every CPU, the engine as a user starts it;
- ``pinned``: this process's and vLLM's engine process's threads held on four CPUs;
- ``gc_off``: this process's garbage collector off across the pair;
- ``after_idle``: one second of idle host and GPU before the pair (what an interleaved side sees while
  the other sides take their turn).

Per pair it records the bench's decode step, ``(t(128) - t(1)) / 127``, and the same step from the
128-token call alone (vLLM's per-request first- and last-token times, which leave prefill out), plus the
CPU time the hypervisor stole during the pair and the GPU's SM clock after it. The summary gives each
condition's median, the spread of ratios between its consecutive pairs (the noise a stock-against-stock
pairing would show under that condition) and of its ratios to the default pair of the same round.

    python3 benchmarks/host_noise.py --summarize OUT_JSON   (the summary again, from the saved pairs)
"""
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vllm_mirage.cli.models import resolve_model
from vllm_mirage.cli.prompts import fallback_token_ids, take_batch

NEW_TOKENS = 128
PINNED_CPUS = {4, 5, 6, 7}
ALL_CPUS = os.sched_getaffinity(0)


def process_tree(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                children.append(int(entry.name))
    return [pid] + [p for c in children for p in process_tree(c)]


def set_affinity(cpus: set[int]) -> None:
    for pid in process_tree(os.getpid()):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass  # a thread that ended meanwhile


def stolen_jiffies() -> int:
    return int(Path("/proc/stat").read_text().splitlines()[0].split()[8])


def sm_clock_mhz() -> int | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 else None


def in_call_step(outs) -> float:
    """Median over requests of (last token - first token) / (tokens - 1), from vLLM's request stats (the
    engine keeps them because it runs with disable_log_stats=False)."""
    return statistics.median((o.metrics.last_token_ts - o.metrics.first_token_ts) / (len(o.outputs[0].token_ids) - 1)
                             for o in outs)


def timed_pair(llm, batch, one, full) -> dict:
    stolen = stolen_jiffies()
    t0 = time.perf_counter()
    llm.generate(batch, one, use_tqdm=False)
    t1 = time.perf_counter()
    outs = llm.generate(batch, full, use_tqdm=False)
    tn = time.perf_counter() - t1
    return {"decode_ms": (tn - (t1 - t0)) / (NEW_TOKENS - 1) * 1e3, "in_call_ms": in_call_step(outs) * 1e3,
            "stolen_jiffies": stolen_jiffies() - stolen, "sm_mhz": sm_clock_mhz()}


def condition_pair(name, llm, batch, one, full) -> dict:
    if name == "pinned":
        set_affinity(PINNED_CPUS)
    if name == "gc_off":
        gc.disable()
    if name == "after_idle":
        time.sleep(1.0)
    try:
        return timed_pair(llm, batch, one, full)
    finally:
        gc.enable()
        if name == "pinned":
            set_affinity(ALL_CPUS)


def spread(values: list[float], default: list[float]) -> dict:
    """Median; the ratios of consecutive pairs (their median |log|, 10th and 90th percentiles); the ratios
    to the default pair of the same round (their median, 10th and 90th percentiles)."""
    ratios = [a / b for a, b in zip(values[::2], values[1::2])]
    logs = sorted(abs(math.log(r)) for r in ratios)
    q = _deciles(ratios)
    to_default = [v / base for v, base in zip(values, default)]
    d = _deciles(to_default)
    return {"median": statistics.median(values), "pair_ratio_p10": q[0], "pair_ratio_p90": q[-1],
            "pair_ratio_median_abs_log": logs[len(logs) // 2],
            "to_default_median": statistics.median(to_default), "to_default_p10": d[0], "to_default_p90": d[-1]}


def _deciles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=10) if len(values) > 1 else [math.nan] * 9


def summarize(pairs: dict[str, list[dict]]) -> dict:
    def steps(name, key):
        return [p[key] for p in pairs[name]]

    return {name: {key: spread(steps(name, key), steps("default", key)) for key in ("decode_ms", "in_call_ms")}
            | {"stolen_jiffies": sum(p["stolen_jiffies"] for p in ps),
               "sm_mhz": sorted({p["sm_mhz"] for p in ps if p["sm_mhz"] is not None})}
            for name, ps in pairs.items()}


def print_summary(batch_size, summary: dict) -> None:
    for name, s in summary.items():
        print(batch_size, name, json.dumps(s), flush=True)


def main() -> None:
    if sys.argv[1] == "--summarize":
        for batch_size, saved in json.loads(Path(sys.argv[2]).read_text())["batches"].items():
            print_summary(batch_size, summarize(saved["pairs"]))
        return
    from vllm import LLM, SamplingParams  # here, so that --summarize runs without vLLM

    model = resolve_model(sys.argv[1])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    llm = LLM(model=model.model, load_format=model.load_format, skip_tokenizer_init=True,
              async_scheduling=True, enable_prefix_caching=False, disable_log_stats=False,
              compilation_config={"cudagraph_capture_sizes": [1, 8]})
    prompts = Path("vllm_mirage/data/test_prompts.txt").read_text().splitlines()
    vocab = llm.llm_engine.model_config.get_vocab_size()
    inputs = [{"prompt_token_ids": fallback_token_ids(p, vocab)[:512]} for p in prompts if p.strip()]
    common = dict(temperature=0.0, ignore_eos=True, detokenize=False)
    one, full = SamplingParams(max_tokens=1, **common), SamplingParams(max_tokens=NEW_TOKENS, **common)
    conditions = ["default", "pinned", "gc_off", "after_idle"]
    result = {"cpus": sorted(os.sched_getaffinity(0)), "pinned_cpus": sorted(PINNED_CPUS),
              "engine_processes": len(process_tree(os.getpid())), "rounds": rounds, "batches": {}}
    for batch_size in (1, 8):
        batch = take_batch(inputs, batch_size)
        for _ in range(2):
            llm.generate(batch, full, use_tqdm=False)
        pairs = {name: [] for name in conditions}
        for r in range(rounds):
            k = r % len(conditions)
            for name in conditions[k:] + conditions[:k]:
                pairs[name].append(condition_pair(name, llm, batch, one, full))
        summary = summarize(pairs)
        result["batches"][batch_size] = {"pairs": pairs, "summary": summary}
        print_summary(batch_size, summary)
    Path(sys.argv[2]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

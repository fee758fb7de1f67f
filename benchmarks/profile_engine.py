"""Where one engine step goes, inside vLLM: wall time per output token, then a torch-profiler pass that
sums GPU kernel time (top kernels by total) and the host time of vLLM's own step sections
(``gpu_model_runner: ...`` annotations), per engine step.

    python benchmarks/profile_engine.py --model qwen3-0.6b --switch megakernel \
        --engine-args '{"speculative_config": {"method": "draft_model", "model": "SAME", "num_speculative_tokens": 3}}' \
        --out OUT.json

"SAME" in --engine-args stands for the model's own path (a model drafting for itself). Each call is one
engine in this process: run one call per side, one after the other, on the same GPU.
"""

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from statistics import median


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b", help="as for vllm-mirage (a preset, random:..., a directory)")
    ap.add_argument("--switch", default="0", help="VLLM_USE_MIRAGE for this engine")
    ap.add_argument("--engine-args", default="{}")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--profile-tokens", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ["VLLM_USE_MIRAGE"] = args.switch
    os.environ["VLLM_CUSTOM_SCOPES_FOR_PROFILING"] = "1"  # vLLM's step sections as profiler annotations

    from vllm import LLM, SamplingParams

    from vllm_mirage.cli.models import resolve_model
    from vllm_mirage.cli.runner import speculative_counters

    model = resolve_model(args.model)
    extra = json.loads(args.engine_args.replace('"SAME"', json.dumps(model.model)))
    trace_dir = Path(tempfile.mkdtemp(prefix="profile-engine-"))
    base = {"max_model_len": 2048, "gpu_memory_utilization": 0.85}
    base.update(extra)
    llm = LLM(model=model.model, load_format=model.load_format, skip_tokenizer_init=True,
              enable_prefix_caching=False, seed=0, disable_log_stats=False,
              profiler_config={"profiler": "torch", "torch_profiler_dir": str(trace_dir),
                               "torch_profiler_with_stack": False}, **base)
    prompts = [{"prompt_token_ids": [(13 * i + 7 * b) % 400 + 10 for i in range(128)]} for b in range(args.batch)]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, detokenize=False)
    full = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True, detokenize=False)

    def timed(params):
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0

    for _ in range(2):
        timed(one), timed(full)
    first = [timed(one) for _ in range(args.iterations)]
    total = [timed(full) for _ in range(args.iterations)]
    result = {
        "model": args.model, "switch": args.switch, "engine_args": extra, "batch": args.batch,
        "tokens": args.tokens, "ttft_ms": 1e3 * median(first),
        "ms_per_token": 1e3 * (median(total) - median(first)) / (args.tokens - 1),
    }
    steps_before = _engine_steps(llm)
    llm.start_profile()
    llm.generate(prompts, SamplingParams(max_tokens=args.profile_tokens, temperature=0, ignore_eos=True,
                                         detokenize=False), use_tqdm=False)
    llm.stop_profile()
    steps = _engine_steps(llm) - steps_before if steps_before is not None else None
    result["profiled"] = summarize(sorted(trace_dir.rglob("*.json*")), args.profile_tokens, steps)
    result["speculative"] = speculative_counters(llm)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "profiled"}))
    print(json.dumps(result["profiled"], indent=1)[:6000])
    sys.stdout.flush()
    # The engine core is a child process holding GPU memory: stop it before leaving, or the next engine
    # started on this GPU finds its memory taken.
    getattr(llm.llm_engine, "engine_core", None) and llm.llm_engine.engine_core.shutdown()
    os._exit(0)


def _engine_steps(llm):
    for m in llm.get_metrics():
        if m.name == "vllm:iteration_tokens_total" and hasattr(m, "count"):
            return m.count
    return None


def summarize(traces: list[Path], tokens: int, steps: int | None) -> dict:
    kernels, sections, counts = Counter(), Counter(), Counter()
    for path in traces:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt") as f:
            events = json.load(f).get("traceEvents", [])
        for e in events:
            if e.get("cat") == "kernel":
                kernels[e["name"][:90]] += e.get("dur", 0)
                counts[e["name"][:90]] += 1
            elif e.get("cat") in ("user_annotation", "gpu_user_annotation") and ": " in e.get("name", ""):
                sections[f"{e['cat']}: {e['name']}"] += e.get("dur", 0)
    per = steps or tokens
    return {
        "traces": [p.name for p in traces], "tokens": tokens, "engine_steps": steps,
        "gpu_kernel_ms_per_step": sum(kernels.values()) / 1e3 / per,
        "top_kernels_ms_per_step": {k: [round(v / 1e3 / per, 4), counts[k]] for k, v in kernels.most_common(15)},
        "sections_ms_per_step": {k: round(v / 1e3 / per, 4) for k, v in sections.most_common(20)},
    }


if __name__ == "__main__":
    main()

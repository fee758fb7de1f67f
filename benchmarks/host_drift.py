"""How much one engine's wall time per decode step moves from one timed block to the next, and whether a
torch-profiler pass changes the blocks timed after it.

    python3 benchmarks/host_drift.py MODEL OUT_JSON

Stock vLLM (no Mirage), async scheduling. Timed blocks at batch 1 and 16 (warm-up 2, 7 pairs each):
before any profiling, after one profiled pair, and once more after that.
"""
import json
import sys
from pathlib import Path
from vllm import LLM, SamplingParams
from vllm_mirage.cli import runner
from vllm_mirage.cli.models import resolve_model
from vllm_mirage.cli.prompts import fallback_token_ids, take_batch

model = resolve_model(sys.argv[1])
prof = Path("/tmp/prof-after").resolve(); prof.mkdir(parents=True, exist_ok=True)
args = dict(model=model.model, load_format=model.load_format, async_scheduling=True, enable_prefix_caching=False,
            compilation_config={"cudagraph_capture_sizes": [1, 16]})
runner._enable_profiler(args, prof)
llm = LLM(**args)
prompts = Path("vllm_mirage/data/test_prompts.txt").read_text().splitlines()
vocab = llm.llm_engine.model_config.get_vocab_size()
inputs = [{"prompt_token_ids": fallback_token_ids(p, vocab)[:512]} for p in prompts if p.strip()]
common = dict(temperature=0.0, ignore_eos=True, detokenize=False)
one, full = SamplingParams(max_tokens=1, **common), SamplingParams(max_tokens=128, **common)
spec = {"num_warmup": 2, "num_iterations": 7}

def block(label):
    out = {}
    for bs in (1, 16):
        t = runner._time_batch(llm, take_batch(inputs, bs), one, full, spec, runner._Progress(None), None)
        steps = sorted((tn - t1) / 127 * 1e3 for t1, tn in zip(t["first_token_s"], t["total_s"]))
        out[bs] = {"decode_step_ms": steps, "median_ms": steps[len(steps) // 2]}
        print(label, bs, round(out[bs]["median_ms"], 3), flush=True)
    return out

result = {"before": block("before")}
gpu = runner._profiled_kernel_seconds(llm, take_batch(inputs, 1), full, prof)
result["profiled_gpu_step_ms"] = gpu / 127 * 1e3 if gpu else None
result["after_one_profile"] = block("after")
result["again"] = block("again")
Path(sys.argv[2]).write_text(json.dumps(result, indent=1))

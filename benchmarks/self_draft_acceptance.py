"""Greedy tokens of one engine and, with a speculator, how many drafts its verify passes accepted.

    VLLM_USE_MIRAGE=megakernel python benchmarks/self_draft_acceptance.py --mode eagle --out eagle.json
    VLLM_USE_MIRAGE=0 python benchmarks/self_draft_acceptance.py --mode stock --out stock.json
    python benchmarks/self_draft_acceptance.py --compare stock.json eagle.json

``--mode eagle`` runs the model as its own draft through vLLM's EAGLE speculator (k = 3). Prompts are token
ids, so a checkpoint without a usable tokenizer serves. FlashInfer's sampler is left out (its first use
builds a JIT module for minutes); greedy sampling does not use it. The model's status is read through
``LLM.apply_model``: run the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), as the committed
results were, or allow it to be pickled (``VLLM_ALLOW_INSECURE_SERIALIZATION=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(a: dict, b: dict) -> dict:
    return {"common_prefix": [common_prefix(x, y) for x, y in zip(a["ids"], b["ids"])],
            "tokens_equal": sum(x == y for s, t in zip(a["ids"], b["ids"]) for x, y in zip(s, t)),
            "tokens": sum(len(s) for s in a["ids"])}


def run(args) -> dict:
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    from vllm import LLM, SamplingParams

    from vllm_mirage.cli.models import resolve_model
    from vllm_mirage.cli.runner import speculative_counters
    from vllm_mirage.introspect import mirage_status

    path = str(resolve_model(args.model).model)
    spec = {"method": "eagle", "model": path, "num_speculative_tokens": 3} if args.mode == "eagle" else None
    llm = LLM(model=path, max_model_len=1024, gpu_memory_utilization=0.3, max_num_seqs=16, enforce_eager=args.eager,
              speculative_config=spec, disable_log_stats=False, seed=0,
              compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]})
    prompts = [[(7 * i + 13 * j) % 5000 + 10 for j in range(20 + 9 * i)] for i in range(args.prompts)]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=48, temperature=0),
                        use_tqdm=False)
    seconds = time.perf_counter() - start
    return {"mode": args.mode, "model": args.model, "eager": args.eager, "generate_s": seconds,
            "ids": [list(o.outputs[0].token_ids) for o in outs], "spec": speculative_counters(llm),
            "status": llm.apply_model(mirage_status)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["stock", "eagle"], default="stock")
    parser.add_argument("--model", default="random:qwen3-0.6b")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs, no torch.compile")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--out")
    parser.add_argument("--compare", nargs=2, metavar="JSON", help="compare two runs' tokens instead")
    args = parser.parse_args()
    if args.compare:
        a, b = (json.load(open(p)) for p in args.compare)
        print(json.dumps(compare(a, b)))
        return
    result = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, default=str)
    print(json.dumps({k: result[k] for k in ("mode", "generate_s", "spec")}))


if __name__ == "__main__":
    main()

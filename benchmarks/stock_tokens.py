"""Greedy tokens of stock vLLM only (no Mirage), to measure how far two stock configurations drift apart.

    python benchmarks/stock_tokens.py MODEL_DIR OUT.json '{"tensor_parallel_size": 2}'

Compare two such files with ``python benchmarks/stock_tokens.py --compare A.json B.json``: the match
rate stock-vs-stock is the floor for what ``vllm-mirage check`` can show on the same checkpoint.
"""

import json
import os
import sys


def generate(model: str, out: str, extra: str) -> None:
    os.environ.pop("VLLM_USE_MIRAGE", None)
    from vllm import LLM, SamplingParams

    from vllm_mirage.cli.prompts import fallback_token_ids, load_prompts

    args = dict(dtype="bfloat16", skip_tokenizer_init=True, max_model_len=2048,
                enable_prefix_caching=False, gpu_memory_utilization=0.85)
    llm = LLM(model=model, **{**args, **json.loads(extra)})
    vocab = llm.llm_engine.model_config.get_vocab_size()
    inputs = [{"prompt_token_ids": fallback_token_ids(p, vocab)} for p in load_prompts()]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = llm.generate(inputs, params, use_tqdm=False)
    with open(out, "w") as f:
        json.dump({"args": extra, "token_ids": [list(o.outputs[0].token_ids) for o in outs]}, f)


def _tokens(ref: str) -> list[list[int]]:
    """``OUT.json`` from this script, or ``check.json:stock`` / ``check.json:mirage`` from vllm-mirage check."""
    path, _, side = ref.partition(":")
    data = json.load(open(path))
    return data["sides"][side]["token_ids"] if side else data["token_ids"]


def compare(a: str, b: str) -> None:
    firsts = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), None)
              for s, t in zip(_tokens(a), _tokens(b))]
    diverged = sorted(f for f in firsts if f is not None)
    median = diverged[len(diverged) // 2] if diverged else None
    print(f"{a} vs {b}: {len(firsts) - len(diverged)}/{len(firsts)} identical, "
          f"{diverged.count(0)} diverge at the first token, median first divergence {median}")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        generate(*sys.argv[1:4])

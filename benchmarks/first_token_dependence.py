"""How often does a model's greedy next token survive dropping the sequence's first token?

    python benchmarks/first_token_dependence.py --model random:qwen3-0.6b --out result.json

vLLM's EAGLE speculator hands its draft the target's tokens shifted one to the left (token ``i + 1`` at
position ``i``). A plain model drafting for itself that way (``--mode multi-token-eagle``) sees every token
but a sequence's first, at the right relative distances: its draft is the model's own greedy choice on the
sequence without its first token. The share of positions where that choice equals the choice on the whole
sequence is the ceiling of the first draft's acceptance; later drafts compound it.

Stock vLLM only (``VLLM_USE_MIRAGE`` unset), teacher-forced: one prefill per prompt with and without its first
token, top-1 of ``prompt_logprobs`` at every position both share. Prompts and tokenization are
``vllm-mirage bench``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def agreement(whole: list[list[int]], without_first: list[list[int]]) -> dict:
    """Each list holds one prompt's top-1 predictions, entry ``j`` being the prediction after its first
    ``j + 1`` tokens. ``whole[p][j + 1]`` and ``without_first[p][j]`` follow the same last token."""
    same = total = last_same = 0
    for w, s in zip(whole, without_first, strict=True):
        if len(w) != len(s) + 1:
            raise ValueError(f"prompt lengths {len(w)} and {len(s)} do not differ by the first token")
        same += sum(a == b for a, b in zip(w[1:], s))
        total += len(s)
        last_same += w[-1] == s[-1]
    return {"positions": total, "agree": same, "share": same / total if total else None,
            "last_position_agree": last_same, "prompts": len(whole)}


def _top1(outputs) -> list[list[int]]:
    rows = []
    for o in outputs:
        # prompt_logprobs[0] is None (nothing precedes the first token); the sampled token follows the last.
        row = [max(lp.items(), key=lambda kv: kv[1].logprob)[0] for lp in o.prompt_logprobs[1:]]
        rows.append(row + [o.outputs[0].token_ids[0]])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="as vllm-mirage takes it: tiny, random:<preset>, a path")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.pop("VLLM_USE_MIRAGE", None)

    from vllm import LLM, SamplingParams

    from vllm_mirage.cli.models import resolve_model
    from vllm_mirage.cli.prompts import fallback_token_ids, load_prompts

    model = resolve_model(args.model)
    llm = LLM(model=model.model, load_format=model.load_format, dtype=args.dtype, enforce_eager=True,
              max_model_len=args.max_prompt_tokens + 16, enable_prefix_caching=False, seed=0,
              skip_tokenizer_init=not model.has_tokenizer)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    texts = [p for p in load_prompts() if p.strip()][: args.num_prompts]
    encode = llm.get_tokenizer().encode if model.has_tokenizer else (lambda t: fallback_token_ids(t, vocab))
    ids = [encode(t)[: args.max_prompt_tokens] for t in texts]
    ids = [x for x in ids if len(x) >= 3]
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0, detokenize=False)
    whole = _top1(llm.generate([{"prompt_token_ids": x} for x in ids], params))
    without_first = _top1(llm.generate([{"prompt_token_ids": x[1:]} for x in ids], params))
    result = {"model": args.model, "dtype": args.dtype, "command": " ".join(sys.argv),
              "prompt_tokens": [len(x) for x in ids], **agreement(whole, without_first)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "prompt_tokens"}))


if __name__ == "__main__":
    main()

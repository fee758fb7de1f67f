"""Is greedy decoding on a random-weight Qwen3 checkpoint stable under small numeric perturbations?

The TP=2 vs TP=1 token comparison only means something if the random checkpoint it runs on is not
chaotic: if a last-bit change in a bf16 sum flips a greedy token within a few steps, two correct
engines disagree and the comparison says nothing. This script builds the model in memory exactly as
:func:`vllm_mirage.tiny_model.make_tiny_qwen3` would write it (same seed, same draw order: norm
weights 1+0.3*randn, embeddings embed_std*randn, everything else std*randn) with the real
Qwen3-0.6B shapes, decodes the project's test prompts greedily (byte-fallback token ids, as the CLI
does without a tokenizer) and compares:

* ``bf16``: the reference in float32 against the same model run in bfloat16 (a much larger
  perturbation than TP's reordering, so a conservative proxy);
* ``tp2`` (``--tp2``): bfloat16 against bfloat16 with the row-parallel layers (o_proj, down_proj)
  split in two halves along their input, each half's product rounded to bf16 and the halves summed
  in bf16, as a TP=2 all-reduce does (a close proxy of what TP changes).

The weights are rounded to bf16 first (``--no-round-weights`` turns that off), since vLLM loads the
checkpoint in bf16 and both sides of a TP comparison see the same rounded weights.

Printed: one JSON line with, per comparison, the fraction of sequences identical over all T
tokens, the median first divergence, and non-degeneracy measures of the reference output (distinct
tokens per sequence, fraction stuck on one repeated token over the last 16, fraction of tokens
equal to the token before, mean and median top-1 minus top-2 log-softmax gap along the greedy path).
Per comparison it also gives, at each first divergence, whether the other side picked the
reference's runner-up and the reference's gap there (``div_*``), and a teacher-forced check: the
other side fed the reference's tokens, its per-step argmax agreement (``tf_step_agree``) and the
reference's gap at the steps where they disagree (``tf_mismatch_gap_*``): with a chaotic checkpoint
only near-ties should disagree.

    python benchmarks/checkpoint_stability.py --std 0.02 --embed-std 0.6 --prompts 24 --tokens 64

Runs on CPU (slow: minutes per configuration for the full shapes) or on a GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_mirage.cli.models import qwen3_preset_config  # noqa: E402
from vllm_mirage.cli.prompts import fallback_token_ids, load_prompts  # noqa: E402
from vllm_mirage.tiny_model import randomize_weights_  # noqa: E402

# Keys of the preset that are not Qwen3Config shape/behaviour fields (make_tiny_qwen3 passes its
# own torch_dtype).
_DROP = {"architectures", "model_type", "torch_dtype"}


def build_model(std: float, embed_std: float, *, seed: int = 0, preset: str = "qwen3-0.6b",
                **overrides):
    """The model make_tiny_qwen3(path, seed=seed, std=std, embed_std=embed_std, **config) writes."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = {k: v for k, v in qwen3_preset_config(preset).items() if k not in _DROP}
    config.update(overrides)
    cfg = Qwen3Config(**config, torch_dtype="float32")
    model = Qwen3ForCausalLM(cfg)
    # A tied lm_head is the same Parameter as embed_tokens, so it is drawn once, as in the file.
    randomize_weights_(model, seed=seed, std=std, embed_std=embed_std)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    return model


def make_prompts(n: int, vocab_size: int, max_len: int | None) -> list[list[int]]:
    ids = [fallback_token_ids(p, vocab_size) for p in load_prompts()[:n]]
    if max_len:
        ids = [x[-max_len:] for x in ids]
    return ids


class _TP2Linear(torch.nn.Module):
    """A row-parallel linear as TP=2 computes it: two half products, summed in the model dtype."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        w = self.lin.weight
        k = x.shape[-1] // 2
        return F.linear(x[..., :k], w[:, :k]) + F.linear(x[..., k:], w[:, k:])


def set_tp2(model, on: bool):
    for layer in model.model.layers:
        for mod, attr in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            cur = getattr(mod, attr)
            if on and not isinstance(cur, _TP2Linear):
                setattr(mod, attr, _TP2Linear(cur))
            elif not on and isinstance(cur, _TP2Linear):
                setattr(mod, attr, cur.lin)


def _left_padded(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and positions of a left-padded batch."""
    width = max(len(x) for x in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def greedy(model, prompts: list[list[int]], tokens: int, batch: int, device) -> dict:
    """Greedy continuation (KV cache, left-padded batches). Returns tokens and per-step gaps."""
    out_tokens, gaps, first_logits, top_ids, top_vals = [], [], [], [], []
    for start in range(0, len(prompts), batch):
        ids, mask, pos = _left_padded(prompts[start:start + batch], device)
        past, step_tok, step_gap, step_ids, step_vals = None, [], [], [], []
        cur_ids, cur_pos = ids, pos
        for t in range(tokens):
            out = model(input_ids=cur_ids, attention_mask=mask, position_ids=cur_pos,
                        past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            top = logits.topk(5, dim=-1)
            nxt = logits.argmax(-1)
            step_tok.append(nxt)
            step_gap.append(top.values[:, 0] - top.values[:, 1])  # = log-softmax gap
            step_ids.append(top.indices)
            step_vals.append(top.values)
            if t == 0:
                first_logits.append(logits.cpu())
            cur_ids = nxt[:, None]
            cur_pos = cur_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        out_tokens += torch.stack(step_tok, 1).tolist()
        gaps += torch.stack(step_gap, 1).cpu().tolist()
        top_ids += torch.stack(step_ids, 1).cpu().tolist()
        top_vals += torch.stack(step_vals, 1).cpu().tolist()
    return {"tokens": out_tokens, "gaps": gaps, "first_logits": torch.cat(first_logits),
            "top_ids": top_ids, "top_vals": top_vals}


@torch.no_grad()
def teacher_forced(model, prompts, ref: dict, tokens: int, batch: int, device) -> dict:
    """Argmax of ``model`` at each step when fed the reference's own tokens (one prefill)."""
    argmax = []
    for start in range(0, len(prompts), batch):
        seqs = [p + r[:tokens - 1] for p, r in zip(prompts[start:start + batch],
                                                     ref["tokens"][start:start + batch])]
        ids, mask, pos = _left_padded(seqs, device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                    logits_to_keep=tokens)
        argmax += out.logits.argmax(-1).cpu().tolist()
    return argmax


def tf_compare(ref: dict, argmax: list) -> dict:
    """Per-step agreement on the reference's path, and how close the disagreements were."""
    n, bad_gaps = 0, []
    for s, row in enumerate(argmax):
        for t, tok in enumerate(row):
            n += 1
            if tok != ref["tokens"][s][t]:
                ids, vals = ref["top_ids"][s][t], ref["top_vals"][s][t]
                bad_gaps.append(vals[0] - vals[ids.index(tok)] if tok in ids else float("inf"))
    return {
        "tf_step_agree": round(1 - len(bad_gaps) / n, 4),
        "tf_mismatch_gap_median": _r(statistics.median(bad_gaps)) if bad_gaps else None,
        "tf_mismatch_gap_max": _r(max(bad_gaps)) if bad_gaps else None,
    }


def _r(x: float, nd: int = 3):
    return round(x, nd) if x != float("inf") else "outside_top5"


def compare(ref: dict, other: dict, tokens: int) -> dict:
    firsts = []
    for a, b in zip(ref["tokens"], other["tokens"]):
        firsts.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), tokens))
    # At each first divergence: was it a near-tie? The other side's token's rank in the reference's
    # top 5 (1 = the reference's runner-up; 5 = not in its top 5), and the reference's gap between
    # its own choice and the other side's token (in nats, inf when outside the top 5).
    ranks, div_gaps = [], []
    for s, f in enumerate(firsts):
        if f == tokens:
            continue
        ids, vals, tok = ref["top_ids"][s][f], ref["top_vals"][s][f], other["tokens"][s][f]
        r = ids.index(tok) if tok in ids else 5
        ranks.append(r)
        div_gaps.append(vals[0] - vals[r] if r < 5 else float("inf"))
    la, lb = ref["first_logits"], other["first_logits"]
    rel = ((lb - la).norm(dim=-1) / la.norm(dim=-1)).median().item()
    return {
        "identical_frac": round(sum(f == tokens for f in firsts) / len(firsts), 3),
        "median_first_div": statistics.median(firsts),
        "mean_first_div": round(statistics.mean(firsts), 1),
        "first_step_logit_rel_err": float(f"{rel:.3g}"),
        "div_runner_up_frac": round(sum(r == 1 for r in ranks) / len(ranks), 3) if ranks else None,
        "div_gap_median": _r(statistics.median(div_gaps)) if div_gaps else None,
        "div_gap_max": _r(max(div_gaps)) if div_gaps else None,
    }


def diversity(res: dict) -> dict:
    toks, gaps = res["tokens"], res["gaps"]
    flat_gaps = sorted(g for row in gaps for g in row)
    n_rep = sum(1 for row in toks for a, b in zip(row, row[1:]) if a == b)
    n_pairs = sum(len(row) - 1 for row in toks)
    return {
        "distinct_per_seq": round(statistics.mean(len(set(r)) for r in toks), 1),
        "stuck16_frac": round(sum(len(set(r[-16:])) == 1 for r in toks) / len(toks), 3),
        "repeat_prev_frac": round(n_rep / max(n_pairs, 1), 3),
        "distinct_total": len({t for r in toks for t in r}),
        "gap_mean": round(statistics.mean(flat_gaps), 3),
        "gap_median": round(flat_gaps[len(flat_gaps) // 2], 3),
        "gap_p10": round(flat_gaps[len(flat_gaps) // 10], 3),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--std", type=float, required=True)
    ap.add_argument("--embed-std", type=float, required=True)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--max-prompt-len", type=int, default=None,
                    help="keep only the last N ids of each prompt (default: whole prompt)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tp2", action="store_true", help="also compare bf16 vs emulated TP=2 bf16")
    ap.add_argument("--no-round-weights", action="store_true",
                    help="keep float32 weights for the reference (default: round to bf16 first)")
    ap.add_argument("--layers", type=int, default=None, help="override (testing only)")
    ap.add_argument("--vocab", type=int, default=None, help="override (testing only)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # a float32 reference must really be float32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()
    overrides = {}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
        overrides["max_window_layers"] = args.layers
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    model = build_model(args.std, args.embed_std, seed=args.seed, **overrides)
    if not args.no_round_weights:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    model.to(device)
    prompts = make_prompts(args.prompts, model.config.vocab_size, args.max_prompt_len)
    t_build = time.time() - t0

    ref = greedy(model, prompts, args.tokens, args.batch, device)
    model.to(torch.bfloat16)
    bf = greedy(model, prompts, args.tokens, args.batch, device)
    result = {
        "std": args.std, "embed_std": args.embed_std, "prompts": len(prompts),
        "tokens": args.tokens, "device": str(device),
        "prompt_len_mean": round(statistics.mean(len(p) for p in prompts), 1),
        "fp32_vs_bf16": {**compare(ref, bf, args.tokens),
                         **tf_compare(ref, teacher_forced(model, prompts, ref, args.tokens,
                                                          args.batch, device))},
        "fp32": diversity(ref),
        "bf16": {k: v for k, v in diversity(bf).items() if k in ("distinct_per_seq", "stuck16_frac")},
    }
    if args.tp2:
        set_tp2(model, True)
        tp = greedy(model, prompts, args.tokens, args.batch, device)
        set_tp2(model, False)
        result["bf16_vs_tp2"] = {**compare(bf, tp, args.tokens),
                                 **tf_compare(bf, teacher_forced(model, prompts, bf, args.tokens,
                                                                 args.batch, device))}
    result["build_s"] = round(t_build, 1)
    result["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

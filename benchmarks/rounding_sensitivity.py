"""How far do bf16 rounding differences alone move a random checkpoint's logprobs?

    python benchmarks/rounding_sensitivity.py --model qwen3-0.6b --out sensitivity.json

``vllm-mirage check`` on a ``random:`` checkpoint reports |Δ logprob| between stock vLLM and Mirage. To read
those numbers one needs the size of a difference that is *not* a bug: two correct bf16 implementations
that round at different points. This runs one Qwen3 forward pass in PyTorch on the CPU with the weights
``random:<preset>`` draws (:mod:`vllm_mirage.random_model`) and vLLM's native rounding points (what
``torch.compile`` runs on a GPU: ``vllm.ir.ops.fused_add_rms_norm`` normalises the float32 residual sum),
then the same pass with one rounding changed at a time:

* ``rounded-sum``: the RMS taken of the residual sum rounded to bf16 (vLLM's CUDA ``fused_add_rms_norm``
  kernel, and Mirage's fused kernels and megakernel);
* ``split-k``: every projection reduced in two halves added in float32 (another GEMM kernel's order, as
  cuBLAS picks by shape, or a GEMV's);
* ``silu-unrounded``: SiLU's output kept in float32 into the multiply (a fused kernel that skips that rounding);
* ``rounded-sum+split-k``: both, as Mirage's paths differ from stock's (their own GEMV reduction order and
  the rounded sum).

For each, |Δ logprob| of the reference's top-5 tokens over the prompt positions (mean, max) and how many
positions change their top token. Prompt ids are random; attention is causal over the prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_mirage.cli.models import qwen3_preset_config  # noqa: E402
from vllm_mirage.random_model import seeded_tensor, tensor_specs  # noqa: E402

VARIANTS = ("rounded-sum", "split-k", "silu-unrounded", "rounded-sum+split-k")
BF16 = torch.bfloat16


class Qwen3Numerics:
    """A Qwen3 forward pass whose rounding points are spelled out, for one variant at a time."""

    def __init__(self, config: dict, seed: int):
        self.c = config
        self.w = {spec[0]: seeded_tensor(spec, i, seed, "cpu") for i, spec in enumerate(tensor_specs(config))}
        self.w.setdefault("lm_head.weight", self.w["model.embed_tokens.weight"])
        self.changes: set[str] = set()

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if "split-k" not in self.changes:
            return x @ w.T
        k = x.shape[-1] // 2
        return (x[:, :k].float() @ w[:, :k].float().T + x[:, k:].float() @ w[:, k:].float().T).to(BF16)

    def norm(self, x32: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """vLLM's native RMSNorm: normalise in float32, round, times the weight, round."""
        x = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.c["rms_norm_eps"])
        return x.to(BF16) * w

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor):
        total = x.float() + residual.float()
        residual = total.to(BF16)
        return self.norm(residual.float() if "rounded-sum" in self.changes else total, w), residual

    def rope(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        d = self.c["head_dim"]
        inv = 1.0 / self.c["rope_theta"] ** (torch.arange(0, d, 2).float() / d)
        angles = positions[:, None].float() * inv
        # vLLM's cos/sin cache is cast to the model dtype; the rotation itself runs in float32.
        cos, sin = (f(angles).to(BF16).float()[:, None] for f in (torch.cos, torch.sin))
        a, b = t.float().chunk(2, -1)
        return torch.cat((a * cos - b * sin, b * cos + a * sin), -1).to(BF16)

    def forward(self, ids: torch.Tensor, variant: str | None = None) -> torch.Tensor:
        self.changes = set(variant.split("+")) if variant else set()
        c, w, t = self.c, self.w, ids.shape[0]
        hq, hkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        positions = torch.arange(t)
        x, residual = w["model.embed_tokens.weight"][ids], None
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        for i in range(c["num_hidden_layers"]):
            p = lambda name: w[f"model.layers.{i}.{name}.weight"]  # noqa: E731
            if residual is None:
                h, residual = self.norm(x.float(), p("input_layernorm")), x
            else:
                h, residual = self.add_norm(x, residual, p("input_layernorm"))
            q = self.linear(h, p("self_attn.q_proj")).reshape(t, hq, d)
            k = self.linear(h, p("self_attn.k_proj")).reshape(t, hkv, d)
            v = self.linear(h, p("self_attn.v_proj")).reshape(t, hkv, d)
            q = self.rope(self.norm(q.float(), p("self_attn.q_norm")), positions)
            k = self.rope(self.norm(k.float(), p("self_attn.k_norm")), positions)
            k, v = (z.repeat_interleave(hq // hkv, 1).float() for z in (k, v))
            scores = torch.einsum("thd,shd->hts", q.float(), k) / math.sqrt(d)
            attn = torch.einsum("hts,shd->thd", scores.masked_fill(causal, float("-inf")).softmax(-1), v)
            x = self.linear(attn.to(BF16).reshape(t, hq * d), p("self_attn.o_proj"))
            h, residual = self.add_norm(x, residual, p("post_attention_layernorm"))
            gate, up = self.linear(h, p("mlp.gate_proj")), self.linear(h, p("mlp.up_proj"))
            silu = torch.nn.functional.silu(gate.float())
            act = (silu if "silu-unrounded" in self.changes else silu.to(BF16).float()) * up.float()
            x = self.linear(act.to(BF16), p("mlp.down_proj"))
        h, _ = self.add_norm(x, residual, w["model.norm.weight"])
        return (h @ w["lm_head.weight"].T).float().log_softmax(-1)


def compare(reference: torch.Tensor, other: torch.Tensor, top_k: int = 5) -> dict:
    top = reference.topk(top_k, -1).indices
    diff = (other.gather(-1, top) - reference.gather(-1, top)).abs()
    return {"mean_diff": diff.mean().item(), "max_diff": diff.max().item(),
            "top1_changed": int((other.argmax(-1) != reference.argmax(-1)).sum()), "positions": reference.shape[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3-0.6b", help="a Qwen3 preset (its shapes)")
    ap.add_argument("--layers", type=int, help="fewer layers than the preset's")
    ap.add_argument("--tokens", type=int, default=32, help="prompt positions compared")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    config = qwen3_preset_config(args.model)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    torch.manual_seed(args.seed)
    ids = torch.randint(0, config["vocab_size"], (args.tokens,))
    with torch.no_grad():
        model = Qwen3Numerics(config, args.seed)
        reference = model.forward(ids)
        results = {v: compare(reference, model.forward(ids, v)) for v in VARIANTS}
    for v, r in results.items():
        print(f"{v:>19}: top-5 |Δ logprob| mean {r['mean_diff']:.3f}, max {r['max_diff']:.3f} nats; "
              f"top token changed at {r['top1_changed']}/{r['positions']} positions")
    if args.out:
        report = {"command": " ".join(["python", "benchmarks/rounding_sensitivity.py", *(argv or sys.argv[1:])]),
                  "model": args.model, "layers": config["num_hidden_layers"], "tokens": args.tokens,
                  "seed": args.seed, "torch": torch.__version__, "results": results}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

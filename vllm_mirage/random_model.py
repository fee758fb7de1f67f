"""A Qwen3 checkpoint of real shapes with scaled random weights, written locally (no hub).

    python -m vllm_mirage.random_model CONFIG_JSON OUT_DIR [--seed N]

vLLM's dummy weights are tiny uniform values: every logit is nearly the same, so a kernel that gets
attention wrong barely moves them and token or logprob comparisons say little. Here each matrix is
scaled so that every part of the network matters:

* projections ``W [out, in]``: ``N(0, 1/in)``, so a sublayer maps a unit-RMS input to a unit-RMS
  output; the residual stream grows like the square root of the depth and no layer is negligible;
* norm weights ``1 + 0.3 N(0, 1)``; the q/k norms also carry a factor ``sqrt(ATTENTION_LOGIT_STD)``,
  so that query-key scores spread with that std: attention then picks a few positions (a wrong
  position, window or cache entry changes its output) instead of averaging everything;
* embeddings (and lm_head) ``N(0, (LOGIT_STD)^2 / hidden)``: logits after the final norm spread with
  a std of ``LOGIT_STD`` nats, so over a 151936-token vocabulary the top token stands out (top-1/top-2
  gaps of a large fraction of a nat) without being certain.

Tensors are drawn on the current device (a GPU when there is one: an 8B checkpoint is 16 GB of
bfloat16), each from its own generator seeded with ``(seed, index)``, and written as safetensors shards
of at most ``SHARD_BYTES``. The draws depend on the generator's device; ``random_weights.json`` records
it. The tokenizer is :func:`vllm_mirage.tiny_model.make_tokenizer`'s, at the model's vocabulary size.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

ATTENTION_LOGIT_STD = 3.0
LOGIT_STD = 4.0
NORM_NOISE = 0.3
SHARD_BYTES = 4 << 30
QWEN3_SPECIAL_IDS = [151643, 151644, 151645]  # <|endoftext|>, <|im_start|>, <|im_end|>
METADATA = "random_weights.json"


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every tensor of a Qwen3ForCausalLM checkpoint, in file order; init is
    "proj", "norm", "qk_norm" or "embed"."""
    h, inter, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    specs = [("model.embed_tokens.weight", (config["vocab_size"], h), "embed")]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "self_attn.q_proj.weight", (q, h), "proj"),
            (p + "self_attn.k_proj.weight", (kv, h), "proj"),
            (p + "self_attn.v_proj.weight", (kv, h), "proj"),
            (p + "self_attn.q_norm.weight", (d,), "qk_norm"),
            (p + "self_attn.k_norm.weight", (d,), "qk_norm"),
            (p + "self_attn.o_proj.weight", (h, q), "proj"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
            (p + "mlp.gate_proj.weight", (inter, h), "proj"),
            (p + "mlp.up_proj.weight", (inter, h), "proj"),
            (p + "mlp.down_proj.weight", (h, inter), "proj"),
        ]
    specs.append(("model.norm.weight", (h,), "norm"))
    if not config.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", (config["vocab_size"], h), "embed"))
    return specs


def seeded_tensor(spec: tuple[str, tuple[int, ...], str], index: int, seed: int, device):
    """Tensor ``index`` of :func:`tensor_specs` as the checkpoint of ``seed`` holds it, from its own generator."""
    import torch

    _, shape, init = spec
    return _draw(shape, init, torch.Generator(device).manual_seed(seed * 1_000_003 + index), device)


def _draw(shape: tuple[int, ...], init: str, generator, device):
    import torch

    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if init == "proj":
        x *= 1.0 / math.sqrt(shape[1])
    elif init == "embed":
        x *= LOGIT_STD / math.sqrt(shape[1])
    else:
        x = 1.0 + NORM_NOISE * x
        if init == "qk_norm":
            # q·k / sqrt(d) of two unit-RMS heads has std 1; both norms scaled by s^(1/2) make it s.
            x *= math.sqrt(ATTENTION_LOGIT_STD)
    return x.to(torch.bfloat16)


def _shards(specs, limit: int) -> list[list[int]]:
    shards, size = [[]], 0
    for i, (_, shape, _) in enumerate(specs):
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def write_random_qwen3(config: dict, path: str | Path, *, seed: int = 0, device: str | None = None,
                       shard_bytes: int = SHARD_BYTES) -> Path:
    """Write ``config`` (a Qwen3 config.json dict), its random bfloat16 weights and a tokenizer to ``path``."""
    import torch
    from safetensors.torch import save_file

    from vllm_mirage.tiny_model import make_tokenizer, save_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    specs = tensor_specs(config)
    shards = _shards(specs, shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map, total = {}, 0
    for file, members in zip(names, shards):
        tensors = {}
        for i in members:
            name, shape, _ = specs[i]
            tensors[name] = seeded_tensor(specs[i], i, seed, device).cpu()
            weight_map[name] = file
            total += 2 * math.prod(shape)
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    save_tokenizer(make_tokenizer(config["vocab_size"], QWEN3_SPECIAL_IDS), path)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}) + "\n")
    (path / METADATA).write_text(json.dumps({
        "seed": seed, "generator_device": torch.device(device).type, "attention_logit_std": ATTENTION_LOGIT_STD,
        "logit_std": LOGIT_STD, "norm_noise": NORM_NOISE,
    }, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="config.json of the checkpoint to write")
    parser.add_argument("out", help="directory to write it to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_random_qwen3(json.loads(Path(args.config).read_text()), args.out, seed=args.seed)


if __name__ == "__main__":
    main()

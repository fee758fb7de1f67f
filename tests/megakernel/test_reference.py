"""The layerwise reference decode step is Qwen3: it continues a transformers Qwen3 from its own KV cache."""

import torch

from tests.ops.test_qk_norm_rope import _cos_sin_cache
from vllm_mirage.megakernel import reference
from vllm_mirage.megakernel.state import DecodeBatch, DecodeWeights
from vllm_mirage.tiny_model import make_tiny_qwen3


def test_decode_step_continues_transformers_qwen3(tmp_path):
    from transformers import Qwen3ForCausalLM

    path = make_tiny_qwen3(tmp_path / "m", with_tokenizer=False, num_hidden_layers=3)
    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    d, hkv, block = cfg.head_dim, cfg.num_key_value_heads, 16
    prompt = torch.randint(0, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    new = torch.tensor([[7], [300]])
    with torch.no_grad():
        past = model(prompt, use_cache=True).past_key_values
        want = model(new, past_key_values=past).logits[:, -1]  # this also appends to `past`

    layers = model.model.layers
    weights = DecodeWeights(
        input_norm=[l.input_layernorm.weight for l in layers],
        qkv=[torch.cat([l.self_attn.q_proj.weight, l.self_attn.k_proj.weight, l.self_attn.v_proj.weight])
             for l in layers],
        q_norm=[l.self_attn.q_norm.weight for l in layers],
        k_norm=[l.self_attn.k_norm.weight for l in layers],
        o=[l.self_attn.o_proj.weight for l in layers],
        post_norm=[l.post_attention_layernorm.weight for l in layers],
        gate_up=[torch.cat([l.mlp.gate_proj.weight, l.mlp.up_proj.weight]) for l in layers],
        down=[l.mlp.down_proj.weight for l in layers],
        final_norm=model.model.norm.weight,
        lm_head=model.lm_head.weight,
        cos_sin_cache=_cos_sin_cache(64, d, base=cfg.rope_parameters["rope_theta"]),
        eps=cfg.rms_norm_eps,
    )
    # transformers' cache holds rotated keys [B, Hkv, S, D]: lay the 21 prompt tokens into paged blocks.
    tables = torch.tensor([[5, 2], [0, 7]], dtype=torch.int32)
    caches = []
    for layer in range(len(layers)):
        cache = torch.full((2, 8, block, hkv, d), float("nan"))
        for b in range(2):
            for kind, src in enumerate((past.layers[layer].keys, past.layers[layer].values)):
                for pos in range(21):
                    cache[kind, tables[b, pos // block], pos % block] = src[b, :, pos]
        caches.append(cache)
    slots = torch.tensor([int(tables[b, 1]) * block + 21 - block for b in range(2)])
    batch = DecodeBatch(torch.tensor([21, 21]), tables, slots, [c[0] for c in caches], [c[1] for c in caches])
    with torch.no_grad():
        got = reference.decode_step(weights, batch, model.model.embed_tokens(new[:, 0]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

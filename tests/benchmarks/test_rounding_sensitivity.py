"""benchmarks/rounding_sensitivity.py: every variant changes the rounding it names, and nothing else."""

import torch

from tests.benchmarks import load_script
from vllm_mirage.cli.models import qwen3_preset_config


def test_each_variant_moves_the_logprobs_and_the_reference_is_deterministic():
    m = load_script("rounding_sensitivity")
    config = {**qwen3_preset_config("qwen3-0.6b"), "hidden_size": 512, "intermediate_size": 1536,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}
    model = m.Qwen3Numerics(config, seed=0)
    # A split reduction moves a bf16 output only where the two float32 sums round apart, about one element
    # in ten thousand: 8 tokens of this model left every logprob as it was on one x86 CPU, 32 do not.
    tokens = 32
    ids = torch.randint(0, config["vocab_size"], (tokens,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.forward(ids)
        assert m.compare(reference, model.forward(ids)) == {"mean_diff": 0.0, "max_diff": 0.0, "top1_changed": 0,
                                                            "positions": tokens}
        for variant in m.VARIANTS:
            assert m.compare(reference, model.forward(ids, variant))["max_diff"] > 0, variant
    assert torch.isfinite(reference).all() and reference.shape == (tokens, config["vocab_size"])

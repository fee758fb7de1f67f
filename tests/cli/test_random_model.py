"""``random:<preset>``: real Qwen3 shapes with scaled random weights, written locally; here at scaled-down
shapes (the real vocabulary kept), with transformers as the reference forward pass."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.cli.test_models import PUBLISHED, parameter_count
from vllm_mirage.cli import models
from vllm_mirage.cli.errors import CliError
from vllm_mirage.cli.models import qwen3_preset_config, resolve_model
from vllm_mirage.random_model import QWEN3_SPECIAL_IDS, tensor_specs, write_random_qwen3

PROMPT = ("The quick brown fox jumps over the lazy dog. Large language models predict the next token from "
          "the tokens before it. Paris is the capital of France.")


def small_config(**overrides) -> dict:
    """Qwen3-0.6B's config at a fraction of its width and depth; vocabulary and specials unchanged."""
    return {**qwen3_preset_config("qwen3-0.6b"), "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_window_layers": 3, **overrides}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # A small shard limit: the 151936 x 128 embedding alone fills one, so the index path is exercised.
    return write_random_qwen3(small_config(), tmp_path_factory.mktemp("random"), shard_bytes=8 << 20)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_tensors_are_the_checkpoint_of_the_published_shape(name):
    config = qwen3_preset_config(name)
    specs = tensor_specs(config)
    assert sum(math.prod(shape) for _, shape, _ in specs) == parameter_count(config)
    assert ("lm_head.weight" in {n for n, _, _ in specs}) == (not config["tie_word_embeddings"])


def test_checkpoint_loads_in_transformers_and_its_logits_are_not_near_uniform(checkpoint):
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and index["weight_map"].keys() == {
        n for n, _, _ in tensor_specs(small_config())}
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert len(tokenizer) == 151936 and [tokenizer.bos_token_id, tokenizer.eos_token_id] == QWEN3_SPECIAL_IDS[::2]
    assert tokenizer.decode([151000]) == " w151000"  # every id the model can pick decodes to text
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    model = Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(ids).logits.log_softmax(-1)[0]
    top = logprobs.topk(2, dim=-1).values
    # Near-uniform logits (vLLM's dummy weights) give top-1 probabilities near 1/151936 and gaps near 0.
    assert top[:, 0].exp().mean() > 0.05
    assert (top[:, 0] - top[:, 1]).median() > 0.2
    assert len(set(logprobs.argmax(-1).tolist())) > ids.shape[1] // 2  # not one token everywhere


def test_a_sliding_window_changes_the_output(checkpoint):
    # Attention picks a few positions (scaled q/k norms): a window that hides them moves the logits by nats.
    from transformers import Qwen3Config, Qwen3ForCausalLM, AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(checkpoint).encode(PROMPT)])
    out = []
    for extra in ({}, {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}):
        config = Qwen3Config(**small_config(**extra))
        model = Qwen3ForCausalLM.from_pretrained(checkpoint, config=config, dtype=torch.float32).eval()
        with torch.no_grad():
            out.append(model(ids).logits.log_softmax(-1)[0, -1])
    full, windowed = out
    top = full.topk(5).indices
    assert (full[top] - windowed[top]).abs().max() > 1.0


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_ones(checkpoint, tmp_path):
    from safetensors.torch import load_file

    config = small_config(num_hidden_layers=1, vocab_size=1024)  # only the first tensors' draws matter here
    a = load_file(write_random_qwen3(config, tmp_path / "a") / "model.safetensors")
    b = load_file(write_random_qwen3(config, tmp_path / "b") / "model.safetensors")
    c = load_file(write_random_qwen3(config, tmp_path / "c", seed=1) / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    assert a[name].dtype == torch.bfloat16
    assert json.loads((tmp_path / "a" / "random_weights.json").read_text())["generator_device"] == "cpu"


def test_resolution_writes_once_and_the_sliding_variant_shares_the_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "qwen3_preset_config", lambda name: small_config(num_hidden_layers=1))
    m = resolve_model("random:Qwen3-0.6B", tmp_path)
    assert (m.kind, m.load_format, m.has_tokenizer, m.is_qwen3) == ("random", "auto", True, True)
    weights = tmp_path / "random-qwen3-0.6b-seed0" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert resolve_model("random:qwen3-0.6b", tmp_path).model == m.model and weights.stat().st_mtime_ns == before

    s = resolve_model("random:qwen3-0.6b+sliding", tmp_path)
    assert (s.config["use_sliding_window"], s.config["sliding_window"], s.config["max_window_layers"]) == (True, 128, 0)
    linked = tmp_path / "random-qwen3-0.6b+sliding128-seed0" / "model.safetensors"
    assert linked.is_symlink() and linked.resolve() == weights.resolve()
    assert resolve_model("random:qwen3-0.6b+sliding=64", tmp_path).config["sliding_window"] == 64
    assert weights.stat().st_mtime_ns == before


def test_the_layers_variant_writes_its_own_checkpoint_and_combines_with_sliding(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "qwen3_preset_config", lambda name: small_config(num_hidden_layers=3))
    m = resolve_model("random:qwen3-8b+layers=1", tmp_path)
    assert (m.config["num_hidden_layers"], m.config["max_window_layers"]) == (1, 1)
    names = [k for f in (tmp_path / "random-qwen3-8b-l1-seed0").glob("*.safetensors") for k in safe_open(f, "pt").keys()]
    assert {k.split(".")[2] for k in names if k.startswith("model.layers.")} == {"0"}
    s = resolve_model("random:qwen3-8b+sliding=16+layers=1", tmp_path)
    assert (s.config["num_hidden_layers"], s.config["sliding_window"], s.config["max_window_layers"]) == (1, 16, 0)
    assert Path(s.model).name == "random-qwen3-8b-l1+sliding16-seed0"
    assert not (tmp_path / "random-qwen3-8b-seed0").exists()  # the full-depth checkpoint is never written


@pytest.mark.parametrize("name, message", [
    ("random:qwen3-7b", "random: takes one of"), ("random:tiny", "random: takes one of"),
    ("random:qwen3-0.6b+slide", "unknown variant"), ("random:qwen3-0.6b+sliding=0", "unknown variant"),
    ("random:qwen3-0.6b+layers", "unknown variant"), ("random:qwen3-0.6b+layers=0", "unknown variant"),
    ("random:qwen3-0.6b+layers=2+layers=3", "unknown variant"),
])
def test_unknown_random_models(name, message, tmp_path):
    with pytest.raises(CliError, match=message):
        resolve_model(name, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written for a name that does not resolve

import json

import pytest

from vllm_mirage.cli.errors import CliError
from vllm_mirage.cli.models import PRESETS, qwen3_preset_config, resolve_model

# The published shapes (Qwen/Qwen3-* config.json), restated here on purpose: the test checks the
# table in models.py against an independent copy, and against the advertised parameter counts.
PUBLISHED = {
    # name: (hidden, intermediate, layers, heads, kv_heads, tied, parameters in billions)
    "qwen3-0.6b": (1024, 3072, 28, 16, 8, True, 0.6),
    "qwen3-1.7b": (2048, 6144, 28, 16, 8, True, 1.7),
    "qwen3-4b": (2560, 9728, 36, 32, 8, True, 4.0),
    "qwen3-8b": (4096, 12288, 36, 32, 8, False, 8.2),
    "qwen3-14b": (5120, 17408, 40, 40, 8, False, 14.8),
    "qwen3-32b": (5120, 25600, 64, 64, 8, False, 32.8),
}


def parameter_count(c: dict) -> int:
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h + 2 * d  # attn, mlp, norms, q/k norms
    embeddings = c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2)
    return embeddings + c["num_hidden_layers"] * per_layer + h


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_config_matches_published_qwen3(name):
    hidden, inter, layers, heads, kv, tied, billions = PUBLISHED[name]
    c = qwen3_preset_config(name)
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (hidden, inter, layers)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["tie_word_embeddings"]) == (heads, kv, tied)
    assert c["head_dim"] == 128 and c["vocab_size"] == 151936 and c["max_position_embeddings"] == 40960
    assert c["rms_norm_eps"] == 1e-6 and c["rope_theta"] == 1000000 and c["torch_dtype"] == "bfloat16"
    assert c["architectures"] == ["Qwen3ForCausalLM"] and c["model_type"] == "qwen3"
    assert parameter_count(c) / 1e9 == pytest.approx(billions, rel=0.03)


def test_preset_resolution_writes_a_config_transformers_reads(tmp_path):
    from transformers import AutoConfig

    m = resolve_model("Qwen3-8B", tmp_path)  # case-insensitive
    assert (m.kind, m.load_format, m.has_tokenizer, m.is_qwen3) == ("preset", "dummy", False, True)
    cfg = AutoConfig.from_pretrained(m.model)
    assert cfg.model_type == "qwen3" and cfg.hidden_size == 4096 and cfg.tie_word_embeddings is False
    assert m.to_spec()["vocab_size"] == 151936


def test_tiny_is_built_once_and_has_a_tokenizer(cli_cache):
    m = resolve_model("tiny", cli_cache)
    weights = cli_cache / "tiny-qwen3" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert (m.kind, m.load_format, m.has_tokenizer, m.is_qwen3) == ("tiny", "auto", True, True)
    assert resolve_model("tiny", cli_cache).model == m.model
    assert weights.stat().st_mtime_ns == before


def test_local_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 99}))
    m = resolve_model(str(tmp_path))
    # No weights: the directory still works for timing, with random values.
    assert (m.kind, m.load_format, m.has_tokenizer, m.is_qwen3, m.vocab_size) == ("local", "dummy", False, False, 99)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    m = resolve_model(str(tmp_path))
    assert (m.load_format, m.has_tokenizer) == ("auto", True)


def test_directory_without_config(tmp_path):
    with pytest.raises(CliError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_hub_id_passes_through(tmp_path):
    m = resolve_model("Qwen/Qwen3-0.6B", tmp_path)
    assert (m.model, m.kind, m.is_qwen3) == ("Qwen/Qwen3-0.6B", "hub", None)


@pytest.mark.parametrize("name, message", [
    ("qwen3-7b", "unknown model"), ("llama", "unknown model"),
    ("./missing", "not found"), ("/abs/missing/dir", "not found"), ("a/b/c", "not found"),
])
def test_unknown_models(name, message, tmp_path):
    with pytest.raises(CliError, match=message) as e:
        resolve_model(name, tmp_path)
    if message == "unknown model":
        assert all(p in str(e.value) for p in PRESETS)

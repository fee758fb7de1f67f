import pytest

from vllm_mirage.cli.errors import classify_failure, last_error_line

OOM_TEXTS = [
    "Traceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "RuntimeError: CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing the engine.",
    "ValueError: To serve at least one request with the models's max seq len (40960), (5.6 GiB KV cache is needed, "
    "which is larger than the available KV cache memory (1.2 GiB).",
]


@pytest.mark.parametrize("text", OOM_TEXTS)
def test_out_of_memory_suggests_smaller_settings(text):
    msg = classify_failure(text)
    assert msg.startswith("out of memory:")
    assert "--batch-sizes" in msg and "--max-model-len" in msg and "--gpu-memory-utilization" in msg
    assert "\n" not in msg


def test_other_failures():
    switch = "  File x\nValueError: VLLM_USE_MIRAGE='2' is not valid; allowed values: '0', '1', 'megakernel' or unset"
    assert classify_failure(switch) == "invalid switch: VLLM_USE_MIRAGE='2' is not valid; allowed values: '0', '1', 'megakernel' or unset"
    offline = "OSError: We couldn't connect to 'https://huggingface.co' to load the files"
    assert "Hugging Face hub" in classify_failure(offline)
    generic = "Traceback...\n  File \"a.py\"\nValueError: Model architectures ['NopeForCausalLM'] are not supported\n\n"
    assert classify_failure(generic) == "engine failed: ValueError: Model architectures ['NopeForCausalLM'] are not supported"


def test_last_error_line_prefers_the_exception_line():
    assert last_error_line("a\nKeyError: 'x'\n  during handling\nsome trailing log") == "KeyError: 'x'"
    assert last_error_line("no exception here\njust logs") == "just logs"
    assert last_error_line("") == ""


def test_pydantic_config_errors_show_the_reason():
    text = (
        "  | pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
        "  |   Value error, The checkpoint has model type `nope` which is not recognised. [type=value_error, input_value=...]\n"
        "  |     For further information visit https://errors.pydantic.dev/2.14/v/value_error\n"
    )
    assert last_error_line(text) == "ValidationError: The checkpoint has model type `nope` which is not recognised."

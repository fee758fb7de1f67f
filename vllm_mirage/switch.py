"""The on/off switch: ``VLLM_USE_MIRAGE`` and its Python mirror.

The variable, not a module global, is the source of truth: vLLM runs the model in an
engine-core child process, and only the environment reaches it.
"""

import os

ENV_VAR = "VLLM_USE_MIRAGE"

# Values and the mode they select. "megakernel" is the fused path plus pure-decode steps run as one
# task graph (vllm_mirage.megakernel), where supported.
_MODES = {"": "off", "0": "off", "1": "fused", "megakernel": "megakernel"}


def mirage_mode() -> str:
    """Return "off", "fused" or "megakernel"; raise ValueError on any other value of the variable."""
    raw = os.environ.get(ENV_VAR, "").strip()
    try:
        return _MODES[raw]
    except KeyError:
        allowed = ", ".join(repr(v) for v in _MODES if v) + " or unset"
        raise ValueError(f"{ENV_VAR}={raw!r} is not valid; allowed values: {allowed}") from None


def is_mirage_enabled() -> bool:
    return mirage_mode() != "off"


def set_use_mirage(enabled: bool) -> None:
    """Turn the fused path on or off for engines created after this call (in this process and
    its children). An engine that already built its model keeps what it was built with."""
    os.environ[ENV_VAR] = "1" if enabled else "0"

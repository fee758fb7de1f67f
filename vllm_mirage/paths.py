"""Where the package keeps files of its own on the user's machine."""

import os
from pathlib import Path

CACHE_ENV = "VLLM_MIRAGE_CACHE"


def cache_root() -> Path:
    """``$VLLM_MIRAGE_CACHE``, else ``$XDG_CACHE_HOME/vllm-mirage`` (``~/.cache/vllm-mirage``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get(CACHE_ENV, Path(base) / "vllm-mirage"))

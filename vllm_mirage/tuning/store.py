"""Where plans come from: the tables shipped for GPUs we measured, else a first-use measurement cached per
machine.

Shipped tables (``vllm_mirage/data/tuning/<gpu>.json``) hold one plan per model shape, measured on that GPU
model with ``vllm-mirage tune`` and the in-vLLM benchmarks they cite. The cache holds what
``vllm_mirage.tuning.measure`` found on this machine, one file per key: GPU name, driver, the versions of
vLLM, torch, Triton and this package, and the model shape. A cache file whose key differs (a driver or
version update) is stale, one that does not parse is corrupt: both are ignored with a warning and replaced.
"""

from __future__ import annotations

import json
import logging
import os
import re
from importlib import resources
from pathlib import Path

from vllm_mirage.paths import cache_root
from vllm_mirage.tuning.plan import DecodePlan, ModelShape

PLAN_ENV = "VLLM_MIRAGE_PLAN"

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger tree, printed with its format


def gpu_slug(gpu_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", gpu_name.lower()).strip("_")


def shipped_plan(gpu_name: str, shape: ModelShape) -> DecodePlan | None:
    """The shipped plan for this GPU model and shape, or None where we have not measured it."""
    table = resources.files("vllm_mirage") / "data" / "tuning" / f"{gpu_slug(gpu_name)}.json"
    if not table.is_file():
        return None
    data = json.loads(table.read_text())
    entry = data.get("shapes", {}).get(shape.key())
    if entry is None:
        return None
    return DecodePlan.from_dict(entry, source=f"shipped table for {data['gpu']}")


def cache_dir() -> Path:
    return cache_root() / "tuning"


def load_plan_file(path: str) -> DecodePlan:
    """A plan given by ``VLLM_MIRAGE_PLAN`` (one plan object, the schema of a table's entries): it replaces
    every table, for measuring one path against another. Malformed: a clear error, not a silent default."""
    try:
        return DecodePlan.from_dict(json.loads(Path(path).read_text()), source=f"{PLAN_ENV}={path}")
    except (OSError, ValueError) as e:
        raise ValueError(f"{PLAN_ENV}={path}: {e}") from None


def cache_key(gpu_name: str, driver: str, versions: dict[str, str], shape: ModelShape) -> dict:
    return {"gpu": gpu_name, "driver": driver, "versions": dict(sorted(versions.items())), "shape": shape.key()}


def _cache_file(key: dict) -> Path:
    # One file per GPU and shape; the rest of the key is checked inside, so an update replaces the file.
    name = f"{gpu_slug(key['gpu'])}-{key['shape']}.json"
    return cache_dir() / name


def load_cached(key: dict) -> DecodePlan | None:
    path = _cache_file(key)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("key") != key:
            logger.warning("vllm-mirage: tuning cache %s is stale (measured for %s); measuring again",
                           path, json.dumps(data.get("key"), sort_keys=True))
            return None
        return DecodePlan.from_dict(data.get("plan"), source=f"measured on this machine ({path})")
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        logger.warning("vllm-mirage: ignoring corrupt tuning cache %s (%s); measuring again", path, e)
        return None


def save_cached(key: dict, plan: DecodePlan) -> Path:
    path = _cache_file(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a second engine starting on the same machine never reads half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "plan": plan.to_dict()}, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path

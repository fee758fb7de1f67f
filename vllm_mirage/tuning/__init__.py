"""Per-GPU decisions: which decode steps and op shapes take Mirage's kernels, and which stay stock's.

``decode_plan(shape, ...)`` returns the plan for this process's GPU: the shipped table for a GPU model we
measured, else the first-use measurement cached on this machine, else a new measurement (then cached).
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version

from vllm_mirage.tuning import store
from vllm_mirage.tuning.plan import DecodePlan, ModelShape, reference_plan

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger tree, printed with its format

__all__ = ["DecodePlan", "ModelShape", "decode_plan", "plan_override", "reference_plan"]


def plan_override() -> DecodePlan | None:
    """The plan of ``VLLM_MIRAGE_PLAN``, on any platform, or None."""
    path = os.environ.get(store.PLAN_ENV)
    return store.load_plan_file(path) if path else None


def decode_plan(shape: ModelShape, dtype, megakernel_limit: int) -> DecodePlan:
    """The CUDA plan for ``shape`` on the current GPU (``megakernel_limit`` caps what a table allows)."""
    import torch

    gpu = torch.cuda.get_device_name()
    plan = plan_override() or store.shipped_plan(gpu, shape)
    if plan is None:
        key = store.cache_key(gpu, driver_version(), versions(), shape)
        plan = store.load_cached(key)
        if plan is None:
            from vllm_mirage.tuning.measure import measure_plan

            logger.info("vllm-mirage: no measurements for %s and shape %s; measuring once (cached in %s)",
                        gpu, shape.key(), store.cache_dir())
            plan = measure_plan(shape, dtype)
            store.save_cached(key, plan)
    plan.megakernel_max_batch = min(plan.megakernel_max_batch, megakernel_limit)
    return plan


def driver_version() -> str:
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip()
    except OSError:  # not a Linux NVIDIA driver: the rest of the key still tells GPUs and versions apart
        return "unknown"


def versions() -> dict[str, str]:
    out = {}
    for dist in ("vllm", "torch", "triton", "vllm-mirage"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "none"
    return out

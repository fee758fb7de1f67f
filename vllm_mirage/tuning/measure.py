"""First-use measurement of a ``DecodePlan`` on a CUDA GPU without a shipped table.

For each op kind and decode token count it times the three kernel paths on random weights of the model's
shape (CUDA graphs, weights rotated past the L2, medians: ``timing.py``) and keeps a fused kernel only where
it beats norm kernel + cuBLAS, stock's own work, by ``MARGIN``. It takes well under a minute on an H100-class
GPU and logs its progress. The megakernel is not measured here: on a GPU or shape without in-vLLM
measurements it stays off (``megakernel_max_batch`` 0), and the fused layers serve decode.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from vllm_mirage.tuning.plan import (
    CHUNKED, KINDS, ROW, TOKENS, UNFUSED, DecodePlan, ModelShape, best_paths, fused_max_tokens,
)
from vllm_mirage.tuning.timing import copies_for, graph_time_us

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger tree, printed with its format

MARGIN = 0.03  # a fused kernel must be this much faster than stock's work to be used
_EPS = 1e-6


def _rows(kind: str, shape: ModelShape) -> int:
    if kind == "norm":
        return (shape.q_heads + 2 * shape.kv_heads) * shape.head_dim
    return 2 * shape.intermediate


def time_paths(kind: str, shape: ModelShape, tokens: int, dtype: torch.dtype) -> dict[str, float]:
    """Microseconds per call of each path that can run ``kind`` at ``tokens`` (inf where one fails)."""
    from vllm_mirage.ops._linear_paths import fused_or_unfused
    from vllm_mirage.ops._row_gemv import fits

    H, n_rows = shape.hidden, _rows(kind, shape)
    copies = copies_for(n_rows * H * torch.finfo(dtype).bits // 8)
    weights = [torch.randn(n_rows, H, device="cuda", dtype=dtype) * H**-0.5 for _ in range(copies)]
    x = torch.randn(tokens, H, device="cuda", dtype=dtype)
    has_norm, silu = kind != "silu", kind != "norm"
    norm_weight = (1 + 0.3 * torch.randn(H, device="cuda")).to(dtype) if has_norm else None
    residual = torch.randn_like(x) if has_norm else None
    times = {}
    for path in (ROW, CHUNKED, UNFUSED):
        if path == ROW and (not has_norm or not fits(tokens, H)):
            continue  # the row GEMV serves the norm ops only
        try:
            times[path] = graph_time_us(
                lambda i, p=path: fused_or_unfused(x, weights[i], norm_weight, _EPS, residual, silu, path=p),
                copies, warmup_ms=10, rep_ms=50,
            )
        except Exception as e:  # e.g. out of shared memory on a smaller GPU: that path is not an option
            logger.warning("vllm-mirage: tuning %s at %d tokens: %s path failed (%s)", kind, tokens, path, e)
            times[path] = math.inf
    if not math.isfinite(times[UNFUSED]):
        raise RuntimeError(f"norm kernel + cuBLAS failed for {kind} at {tokens} tokens")
    return times


def measure_plan(shape: ModelShape, dtype: torch.dtype) -> DecodePlan:
    start = time.monotonic()
    timings: dict[str, dict[int, dict[str, float]]] = {}
    for n, kind in enumerate(KINDS, 1):
        logger.info("vllm-mirage: tuning for %s, %s (%d/%d)", torch.cuda.get_device_name(), kind, n, len(KINDS))
        timings[kind] = {t: time_paths(kind, shape, t, dtype) for t in TOKENS}
    torch.cuda.empty_cache()  # give the rotated weight copies back before vLLM sizes its KV cache
    linear = best_paths(timings, MARGIN)
    plan = DecodePlan(
        linear, fused_max_tokens(linear), megakernel_max_batch=0, source="measured on this machine",
        notes={"timings_us": {k: {str(t): v for t, v in per.items()} for k, per in timings.items()},
               "seconds": round(time.monotonic() - start, 1),
               "megakernel": "not measured at first use: off"},
    )
    logger.info("vllm-mirage: tuning took %.0f s", time.monotonic() - start)
    return plan

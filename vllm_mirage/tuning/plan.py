"""What a decode step of one model runs on one GPU: the per-GPU decisions behind "never slower".

A ``DecodePlan`` holds every speed trade-off the plugin makes, each taken from measurements of the GPU
model it runs on (shipped tables in ``vllm_mirage/data/tuning/``, or a first-use measurement cached under the
user's cache directory, ``vllm_mirage.tuning.store``):

- ``linear``: for each norm/linear op kind and decode token count, which kernel runs it (``ROW``,
  ``CHUNKED`` or ``UNFUSED``, see ``vllm_mirage/ops/_linear_paths.py``);
- ``fused_max_tokens``: the largest pure-decode batch that runs the fused decoder layers; other steps run
  stock vLLM's compiled layers (prefill and mixed batches always do);
- ``megakernel_max_batch``: the largest pure-decode batch the megakernel takes (0: never);
- ``megakernel_launch``: launch settings of the megakernel measured on this GPU for this shape
  (``LaunchConfig`` fields; empty: its defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ROW, CHUNKED, UNFUSED = "row", "chunked", "unfused"
PATHS = (ROW, CHUNKED, UNFUSED)
# Op kinds of the shape rule: norm + linear (QKV), norm + linear + SiLU·mul (gate_up), linear + SiLU·mul.
KINDS = ("norm", "norm_silu", "silu")
# Decode token counts a plan is measured at; a count in between takes the next measured one above it.
TOKENS = (1, 2, 4, 8, 16)
UNBOUNDED = 1 << 30


@dataclass(frozen=True)
class ModelShape:
    """The per-rank shapes that decide which kernel wins (layers do not: every layer is alike)."""

    hidden: int
    intermediate: int  # per rank
    q_heads: int  # per rank
    kv_heads: int  # per rank
    head_dim: int
    tp: int = 1
    dtype: str = "bfloat16"

    def key(self) -> str:
        return (f"h{self.hidden}_i{self.intermediate}_q{self.q_heads}_kv{self.kv_heads}_d{self.head_dim}"
                f"_tp{self.tp}_{self.dtype}")


@dataclass
class DecodePlan:
    linear: dict[str, dict[int, str]]
    fused_max_tokens: int
    megakernel_max_batch: int
    source: str = ""  # where the decisions came from, for the log and ``model.mirage_status``
    notes: dict = field(default_factory=dict)
    megakernel_launch: dict = field(default_factory=dict)

    def linear_path(self, kind: str, tokens: int) -> str:
        if tokens > TOKENS[-1]:
            return UNFUSED
        measured = next(t for t in TOKENS if t >= tokens)
        return self.linear[kind].get(measured, UNFUSED)

    def to_dict(self) -> dict:
        return {
            "linear": {kind: {str(t): p for t, p in paths.items()} for kind, paths in self.linear.items()},
            "fused_max_tokens": self.fused_max_tokens,
            "megakernel_max_batch": self.megakernel_max_batch,
            **({"megakernel_launch": self.megakernel_launch} if self.megakernel_launch else {}),
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str) -> DecodePlan:
        """Parse and validate; raise ValueError on anything malformed (callers treat it as no plan)."""
        if not isinstance(data, dict):
            raise ValueError("a plan is a JSON object")
        linear = data.get("linear")
        if not isinstance(linear, dict) or set(linear) != set(KINDS):
            raise ValueError(f"'linear' must map each of {KINDS} to its paths")
        parsed: dict[str, dict[int, str]] = {}
        for kind, paths in linear.items():
            if not isinstance(paths, dict) or {int(t) for t in paths} != set(TOKENS):
                raise ValueError(f"'linear.{kind}' must give a path for each of {TOKENS} tokens")
            parsed[kind] = {int(t): p for t, p in paths.items()}
            bad = {p for p in parsed[kind].values() if p not in PATHS}
            if bad:
                raise ValueError(f"'linear.{kind}': unknown paths {sorted(bad)} (known: {PATHS})")
        limits = {}
        for name in ("fused_max_tokens", "megakernel_max_batch"):
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"'{name}' must be a non-negative integer")
            limits[name] = value
        launch = _launch_settings(data["megakernel_launch"]) if "megakernel_launch" in data else {}
        return cls(parsed, **limits, source=source, notes=dict(data.get("notes") or {}), megakernel_launch=launch)


def _launch_settings(value) -> dict:
    """``megakernel_launch`` checked against ``LaunchConfig``'s fields (ValueError otherwise)."""
    from dataclasses import fields

    from vllm_mirage.megakernel.kernel import LaunchConfig  # imports Triton: only for tables that tune it

    known = {f.name for f in fields(LaunchConfig)}
    if not isinstance(value, dict) or not set(value) <= known:
        raise ValueError(f"'megakernel_launch' must map LaunchConfig fields ({sorted(known)}) to values")
    for name, v in value.items():
        if not isinstance(v, (int, bool)) or v < 0:
            raise ValueError(f"'megakernel_launch.{name}' must be a non-negative integer or a boolean")
    return dict(value)


def reference_plan(megakernel_max_batch: int) -> DecodePlan:
    """The plan where no GPU speed is at stake (CPU, Triton's interpreter): every decode step through the
    fused layers, every kernel path exercised (the H100-measured rule, which uses all three)."""
    linear = {kind: {t: default_linear_path(kind, t, hidden=1024, row_fits=True) for t in TOKENS} for kind in KINDS}
    return DecodePlan(linear, UNBOUNDED, megakernel_max_batch, source="reference (no GPU timing)")


def default_linear_path(kind: str, tokens: int, hidden: int, row_fits: bool) -> str:
    """The shape rule measured on an H100 (``benchmarks/bench_ops.py``): the row GEMV at 1-2 tokens for the
    norm ops, the chunked GEMV up to 8 tokens for gate_up+SiLU (with a norm only at H <= 1024), else norm
    kernel + cuBLAS. Used where no plan is registered (kernel tests and benchmarks calling ops directly)."""
    has_norm = kind != "silu"
    if has_norm and tokens <= 2 and row_fits:
        return ROW
    if tokens > 8 or kind == "norm":
        return UNFUSED
    return CHUNKED if not has_norm or hidden <= 1024 else UNFUSED


def best_paths(timings_us: dict[str, dict[int, dict[str, float]]], margin: float) -> dict[str, dict[int, str]]:
    """Per kind and token count, the fastest measured path; a fused kernel must beat ``UNFUSED`` (the
    norm kernel + cuBLAS equivalent of stock's code) by ``margin`` (e.g. 0.03) to be chosen."""
    chosen: dict[str, dict[int, str]] = {}
    for kind, per_tokens in timings_us.items():
        chosen[kind] = {}
        for tokens, by_path in per_tokens.items():
            base = by_path[UNFUSED]
            fused = {p: us for p, us in by_path.items() if p != UNFUSED and math.isfinite(us)}
            best = min(fused, key=fused.get, default=None)
            chosen[kind][tokens] = best if best is not None and fused[best] < (1 - margin) * base else UNFUSED
    return chosen


def fused_max_tokens(linear: dict[str, dict[int, str]]) -> int:
    """The largest measured decode batch, counting up from 1 token, at which a layer op still runs a fused
    kernel: past it the fused layer would run norm + cuBLAS, stock's own work with more host code."""
    limit = 0
    for tokens in TOKENS:
        if not any(linear[kind][tokens] != UNFUSED for kind in ("norm", "norm_silu")):
            break
        limit = tokens
    return limit

"""How each fused op is registered with torch, where it runs, and a count of how often it did.

Triton runs on CUDA tensors, and on CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1``,
how CI checks the kernels). Anything else runs the PyTorch reference. ``triton.jit`` picks compiled or
interpreted kernels when this package is imported, so the variable counts only if it is set by then.
"""

import os
from collections import Counter
from collections.abc import Callable

import torch
from torch.library import Library, infer_schema

# The library holds the ops' registrations: it must live as long as the process.
_LIBRARY = Library("vllm_mirage", "FRAGMENT")

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# (op name, backend) -> calls in this process. Python side effects inside a custom op's
# implementation run at every eager call (and once per CUDA-graph capture), so this proves an op
# really ran inside an engine; it is not a profiler.
dispatch_counts: Counter = Counter()


def interpreted() -> bool:
    return _INTERPRETED


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or _INTERPRETED


def record(op: str, triton: bool) -> None:
    dispatch_counts[(op, "triton" if triton else "reference")] += 1


def register_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` (type-annotated, mutating nothing) becomes ``torch.ops.vllm_mirage.<name>``, with
    ``fake`` giving its output shapes to torch.compile; returns the op.

    Not ``torch.library.custom_op``: its Python-side dispatch costs 26–36 µs a call more than a kernel
    registered for the backends directly, as vLLM registers its own ops (on an H100 host; docs/design.md,
    "Host cost of the ops"). Outside CUDA graphs (prefill above the captured
    sizes) a Qwen3 layer calls three of these: ~2.5 ms of host time per 0.6B prefill step."""

    def register(fn: Callable) -> Callable:
        _LIBRARY.define(name + infer_schema(fn, mutates_args=()))
        for backend in ("CPU", "CUDA"):
            _LIBRARY.impl(name, fn, backend)
        torch.library.register_fake(f"vllm_mirage::{name}", fake, lib=_LIBRARY)
        return getattr(torch.ops.vllm_mirage, name).default

    return register

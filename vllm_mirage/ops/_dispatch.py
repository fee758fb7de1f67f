"""Where each fused op runs, and a count of how often it did.

Triton runs on CUDA tensors, and on CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1``,
how CI checks the kernels). Anything else runs the PyTorch reference. ``triton.jit`` picks compiled or
interpreted kernels when this package is imported, so the variable counts only if it is set by then.
"""

import os
from collections import Counter

import torch

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

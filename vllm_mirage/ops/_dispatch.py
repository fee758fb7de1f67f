"""Where each fused op runs, and a count of how often it did.

Triton runs on CUDA tensors, and on CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1``,
how CI checks the kernels). Anything else runs the PyTorch reference. The variable is read per call, so
a test can switch the interpreter on for one process without touching others.
"""

import os
from collections import Counter

import torch

# (op name, backend) -> calls in this process. Python side effects inside a custom op's
# implementation run at every eager call (and once per CUDA-graph capture), so this proves an op
# really ran inside an engine; it is not a profiler.
dispatch_counts: Counter = Counter()


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def record(op: str, triton: bool) -> None:
    dispatch_counts[(op, "triton" if triton else "reference")] += 1


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"

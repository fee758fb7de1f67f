"""How the ops are registered: straight to the CPU and CUDA backends, as vLLM registers its own.

``torch.library.custom_op`` would add a Python autograd layer to every call, 26–36 µs of host time each
on the H100 machine (``vllm_mirage/ops/_dispatch.py``), paid wherever vLLM runs outside CUDA graphs.
"""

import torch

import vllm_mirage.ops  # noqa: F401 - registers the ops


def _ops() -> list[str]:
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("vllm_mirage::"))


def test_every_op_has_backend_kernels_and_no_autograd_layer():
    names = _ops()
    assert {"vllm_mirage::add_rms_norm", "vllm_mirage::qk_norm_rope", "vllm_mirage::rms_norm_linear",
            "vllm_mirage::add_rms_norm_linear_silu_mul"} <= set(names), names
    for name in names:
        has = {key: torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
               for key in ("CPU", "CUDA", "Autograd", "CompositeExplicitAutograd")}
        assert has == {"CPU": True, "CUDA": True, "Autograd": False, "CompositeExplicitAutograd": False}, name

import pytest
import torch

from tests.ops.conftest import assert_close, poisoned, randn
from vllm_mirage import ops
from vllm_mirage.ops import reference
from vllm_mirage.ops._norm_gemv import norm_gemv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,I", [(64, 40), (200, 136), (256, 384), (256, 96)])
@pytest.mark.parametrize("T", [1, 4, 16, 17, 64])
def test_matches_reference(T, H, I, dtype, triton_calls):
    x = randn(T, H, dtype=dtype)
    w = randn(2 * I, H, dtype=dtype, scale=H**-0.5)
    assert_close(ops.linear_silu_mul(x, w), reference.linear_silu_mul(x.double(), w.double()), dtype)
    triton_calls("linear_silu_mul")


def test_fused_kernel_writes_every_element():
    x = randn(9, 200, dtype=torch.float32)
    w = randn(2 * 136, 200, dtype=torch.float32, scale=200**-0.5)
    out = poisoned((9, 136), torch.float32)
    norm_gemv(x, w, silu_mul=True, out=out)
    assert_close(out, reference.linear_silu_mul(x.double(), w.double()), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfused_path_silu_mul_kernel(dtype):
    """The prefill path's SiLU-mul epilogue kernel (after cuBLAS): odd width, more than one column block."""
    from vllm_mirage.ops._norm_gemv import silu_mul_triton

    y = randn(3, 2 * 1100, dtype=dtype)
    out = poisoned((3, 1100), dtype)
    silu_mul_triton(y, out=out)
    gate, up = y.double().chunk(2, dim=-1)
    assert_close(out, torch.nn.functional.silu(gate) * up, dtype)

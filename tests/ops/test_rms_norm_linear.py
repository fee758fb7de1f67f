import pytest
import torch

from tests.ops.conftest import assert_close, poisoned, randn
from vllm_mirage import ops
from vllm_mirage.ops import reference
from vllm_mirage.ops._norm_gemv import norm_gemv

# (H, N): odd sizes, and Qwen3-like shapes scaled down (the interpreter is slow): a QKV output and
# its tensor-parallel shards (N/2, N/8).
SHAPES = [(64, 48), (200, 136), (256, 768), (256, 384), (256, 96), (1024, 256)]


def _inputs(T, H, N, dtype):
    x = randn(T, H, dtype=dtype)
    residual = randn(T, H, dtype=dtype)
    norm_weight = (1 + 0.3 * torch.randn(H)).to(dtype)
    weight = randn(N, H, dtype=dtype, scale=H**-0.5)
    return x, residual, norm_weight, weight


def _ref64(x, norm_weight, weight, residual=None):
    args = [t.double() if t is not None else None for t in (x, norm_weight, weight, residual)]
    return reference.rms_norm_linear(args[0], args[1], args[2], 1e-6, residual=args[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,N", SHAPES)
@pytest.mark.parametrize("T", [1, 3, 16, 17, 64])
def test_matches_reference(T, H, N, dtype, triton_calls):
    x, residual, nw, w = _inputs(T, H, N, dtype)
    assert_close(ops.rms_norm_linear(x, nw, w, 1e-6), _ref64(x, nw, w), dtype)
    out, new_res = ops.rms_norm_linear(x, nw, w, 1e-6, residual=residual)
    ref_out, ref_res = _ref64(x, nw, w, residual)
    assert_close(out, ref_out, dtype)
    assert_close(new_res, ref_res, dtype)
    triton_calls("rms_norm_linear")
    if T <= 16:  # the shape rule sends norm+QKV to cuBLAS on GPU; the GEMV kernel must still be right
        out, new_res = poisoned((T, N), dtype), poisoned((T, H), dtype)
        norm_gemv(x, w, nw, 1e-6, residual=residual, out=out, new_residual=new_res)
        assert_close(out, ref_out, dtype)
        assert_close(new_res, ref_res, dtype)


@pytest.mark.parametrize("T", [1, 5, 8, 40])  # the fused kernel handles any T
def test_fused_kernel_writes_every_element(T):
    H, N, dtype = 200, 136, torch.float32
    x, residual, nw, w = _inputs(T, H, N, dtype)
    out, new_res = poisoned((T, N), dtype), poisoned((T, H), dtype)
    norm_gemv(x, w, nw, 1e-6, residual=residual, out=out, new_residual=new_res)
    ref_out, ref_res = _ref64(x, nw, w, residual)
    assert_close(out, ref_out, dtype)
    assert_close(new_res, ref_res, dtype)


def test_a_broken_prologue_is_caught():
    """The test above must fail if the norm were skipped: the reference really depends on it."""
    x, _, nw, w = _inputs(4, 64, 48, torch.float32)
    with pytest.raises(AssertionError):
        assert_close(torch.nn.functional.linear(x, w), _ref64(x, nw, w), torch.float32)

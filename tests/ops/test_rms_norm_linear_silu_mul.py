import pytest
import torch

from tests.ops.conftest import assert_close, poisoned, randn
from vllm_mirage import ops
from vllm_mirage.ops import reference
from vllm_mirage.ops._norm_gemv import norm_gemv

# (H, I): odd sizes, a scaled-down Qwen3 MLP and its TP shards (I/2, I/4).
SHAPES = [(64, 40), (200, 136), (256, 768), (256, 384), (256, 192)]


def _inputs(T, H, I, dtype):
    return (
        randn(T, H, dtype=dtype),
        randn(T, H, dtype=dtype),
        (1 + 0.3 * torch.randn(H)).to(dtype),
        randn(2 * I, H, dtype=dtype, scale=H**-0.5),
    )


def _ref64(x, nw, w, residual=None):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return reference.rms_norm_linear_silu_mul(d(x), d(nw), d(w), 1e-6, residual=d(residual))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,I", SHAPES)
@pytest.mark.parametrize("T", [1, 3, 16, 17, 64])
def test_matches_reference(T, H, I, dtype, triton_calls):
    x, residual, nw, w = _inputs(T, H, I, dtype)
    assert_close(ops.rms_norm_linear_silu_mul(x, nw, w, 1e-6), _ref64(x, nw, w), dtype)
    out, new_res = ops.rms_norm_linear_silu_mul(x, nw, w, 1e-6, residual=residual)
    ref_out, ref_res = _ref64(x, nw, w, residual)
    assert_close(out, ref_out, dtype)
    assert_close(new_res, ref_res, dtype)
    triton_calls("rms_norm_linear_silu_mul")


@pytest.mark.parametrize("T", [1, 7, 33])
def test_fused_kernel_writes_every_element(T):
    H, I, dtype = 200, 136, torch.float32
    x, residual, nw, w = _inputs(T, H, I, dtype)
    out, new_res = poisoned((T, I), dtype), poisoned((T, H), dtype)
    norm_gemv(x, w, nw, 1e-6, residual=residual, silu_mul=True, out=out, new_residual=new_res)
    ref_out, ref_res = _ref64(x, nw, w, residual)
    assert_close(out, ref_out, dtype)
    assert_close(new_res, ref_res, dtype)


def test_gate_and_up_halves_are_not_swapped():
    x, _, nw, w = _inputs(2, 64, 40, torch.float32)
    swapped = torch.cat(w.chunk(2)[::-1])
    with pytest.raises(AssertionError):
        assert_close(ops.rms_norm_linear_silu_mul(x, nw, swapped, 1e-6), _ref64(x, nw, w), torch.float32)

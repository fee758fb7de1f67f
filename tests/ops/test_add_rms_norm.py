import pytest
import torch

from tests.ops.conftest import assert_close, poisoned, randn
from vllm_mirage import ops
from vllm_mirage.ops import reference
from vllm_mirage.ops.add_rms_norm import rms_norm_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [64, 200, 1024, 4096, 5120])
@pytest.mark.parametrize("T", [1, 3, 64])
def test_matches_reference(T, H, dtype, triton_calls):
    x, residual = randn(T, H, dtype=dtype), randn(T, H, dtype=dtype)
    w = (1 + 0.3 * torch.randn(H)).to(dtype)
    out, new_res = ops.add_rms_norm(x, residual, w, 1e-6)
    ref_out, ref_res = reference.add_rms_norm(x.double(), residual.double(), w.double(), 1e-6)
    assert_close(out, ref_out, dtype)
    assert_close(new_res, ref_res, dtype)
    triton_calls("add_rms_norm")


def test_writes_every_element_with_and_without_residual():
    T, H = 5, 200
    x, residual, w = randn(T, H, dtype=torch.float32), randn(T, H, dtype=torch.float32), torch.randn(H)
    out, new_res = poisoned((T, H), torch.float32), poisoned((T, H), torch.float32)
    rms_norm_triton(x, w, 1e-6, residual=residual, out=out, new_residual=new_res)
    ref_out, ref_res = reference.add_rms_norm(x.double(), residual.double(), w.double(), 1e-6)
    assert_close(out, ref_out, torch.float32)
    assert_close(new_res, ref_res, torch.float32)
    out = poisoned((T, H), torch.float32)
    rms_norm_triton(x, w, 1e-6, out=out)
    assert_close(out, reference._rms_norm(x.double(), w.double(), 1e-6), torch.float32)

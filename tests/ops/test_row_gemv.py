"""The whole-row decode GEMV (``_row_gemv.py``) against the float64 reference, for every op it serves:
norm + linear with and without a residual, norm + gate_up + SiLU, and gate_up + SiLU without a norm."""

import pytest
import torch

from tests.ops.conftest import assert_close, poisoned, randn
from vllm_mirage.ops import reference
from vllm_mirage.ops._row_gemv import fits, row_gemv


def _d(t):
    return None if t is None else t.double()


def _ref64(x, nw, w, residual, silu):
    if nw is None:
        return reference.linear_silu_mul(_d(x), _d(w)), None
    fn = reference.rms_norm_linear_silu_mul if silu else reference.rms_norm_linear
    out = fn(_d(x), _d(nw), _d(w), 1e-6, residual=_d(residual))
    return out if isinstance(out, tuple) else (out, None)


# (H, N): odd sizes, N not a multiple of BLOCK_N, and scaled-down QKV / gate_up shapes with TP shards.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,N", [(64, 46), (200, 137), (256, 384), (256, 96), (1024, 40)])
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("kind", ["norm", "norm+residual", "norm+residual+silu", "silu"])
def test_matches_reference_and_writes_every_element(kind, T, H, N, dtype):
    silu, has_norm, has_res = "silu" in kind, "norm" in kind, "residual" in kind
    x, residual = randn(T, H, dtype=dtype), randn(T, H, dtype=dtype)
    nw = (1 + 0.3 * torch.randn(H)).to(dtype)
    w = randn(2 * N if silu else N, H, dtype=dtype, scale=H**-0.5)
    out, new_res = poisoned((T, N), dtype), poisoned((T, H), dtype)
    # Fewer programs than output slabs, so each program runs the persistent loop more than once.
    got, got_res = row_gemv(x, w, nw if has_norm else None, 1e-6, residual=residual if has_res else None,
                            silu_mul=silu, out=out, new_residual=new_res, config={"BLOCK_N": 4, "PROGRAMS": 3})
    ref_out, ref_res = _ref64(x, nw if has_norm else None, w, residual if has_res else None, silu)
    assert got is out
    assert_close(out, ref_out, dtype)
    if has_res:
        assert got_res is new_res
        assert_close(new_res, ref_res, dtype)


def test_register_budget():
    assert fits(1, 4096) and fits(2, 4096) and fits(8, 1024)
    assert not fits(4, 4096) and not fits(1, 16384) and not fits(0, 1024)

"""The ops on a real GPU at Qwen3 shapes: bf16/fp16 accuracy and CUDA-graph capture.

Run on a CUDA machine with ``python -m pytest -m gpu tests/ops``; deselected by default (see pyproject).
"""

import pytest
import torch

from tests.ops.test_qk_norm_rope import _cos_sin_cache
from vllm_mirage import ops
from vllm_mirage.ops import reference
from vllm_mirage.ops.qk_norm_rope import qk_norm_rope_triton

pytestmark = pytest.mark.gpu

# Qwen3-0.6B, 8B and 32B (H, q heads, kv heads, I) and the 8B at TP=4 (per-rank heads and I).
SHAPES = [(1024, 16, 8, 3072), (4096, 32, 8, 12288), (5120, 64, 8, 25600), (4096, 8, 2, 3072)]
D = 128


def _err(out, ref):
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("GPU test selected on a machine without CUDA")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,hq,hk,I", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 8, 16, 64, 512])  # 1-2: row GEMV; 8: chunked or cuBLAS
def test_ops_match_reference(T, H, hq, hk, I, dtype):
    dev = "cuda"
    x, res = torch.randn(T, H, device=dev, dtype=dtype), torch.randn(T, H, device=dev, dtype=dtype)
    nw = (1 + 0.3 * torch.randn(H, device=dev)).to(dtype)
    qkv_w = (torch.randn((hq + 2 * hk) * D, H, device=dev) * H**-0.5).to(dtype)
    gu_w = (torch.randn(2 * I, H, device=dev) * H**-0.5).to(dtype)
    f = lambda *ts: [t.float() for t in ts]  # noqa: E731

    out, new_res = ops.rms_norm_linear(x, nw, qkv_w, 1e-6, residual=res)
    ref_out, ref_res = reference.rms_norm_linear(*f(x, nw, qkv_w), 1e-6, residual=res.float())
    assert _err(out, ref_out) < 1e-2 and _err(new_res, ref_res) < 1e-2
    assert _err(ops.rms_norm_linear(x, nw, qkv_w, 1e-6), reference.rms_norm_linear(*f(x, nw, qkv_w), 1e-6)) < 1e-2

    out, new_res = ops.rms_norm_linear_silu_mul(x, nw, gu_w, 1e-6, residual=res)
    ref_out, _ = reference.rms_norm_linear_silu_mul(*f(x, nw, gu_w), 1e-6, residual=res.float())
    assert _err(out, ref_out) < 1e-2
    assert _err(ops.linear_silu_mul(x, gu_w), reference.linear_silu_mul(*f(x, gu_w))) < 1e-2

    q, k, _ = torch.randn(T, (hq + 2 * hk) * D, device=dev, dtype=dtype).split([hq * D, hk * D, hk * D], -1)
    qw, kw = [(1 + 0.3 * torch.randn(D, device=dev)).to(dtype) for _ in range(2)]
    pos = torch.randint(0, 40960, (T,), device=dev)
    cache = _cos_sin_cache(40960, D).to(dev, dtype)
    got = ops.qk_norm_rope(q, k, qw, kw, pos, cache, 1e-6)
    want = reference.qk_norm_rope(*f(q, k, qw, kw), pos, cache.float(), 1e-6)
    assert max(_err(a, b) for a, b in zip(got, want)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 8, 512])
@pytest.mark.parametrize("head_dim", [96, 80])
def test_qk_norm_rope_head_dim_not_a_power_of_two(head_dim, T, dtype):
    """Masked over the next power-of-two block of each half head; outputs start as NaN, so an element
    the kernel skips fails the comparison."""
    dev, hq, hk = "cuda", 16, 8
    qkv = torch.randn(T, (hq + 2 * hk) * head_dim, device=dev, dtype=dtype)
    q, k, _ = qkv.split([hq * head_dim, hk * head_dim, hk * head_dim], -1)
    qw, kw = [(1 + 0.3 * torch.randn(head_dim, device=dev)).to(dtype) for _ in range(2)]
    pos = torch.randint(0, 40960, (T,), device=dev)
    cache = _cos_sin_cache(40960, head_dim).to(dev, dtype)
    q_out, k_out = (torch.full(t.shape, float("nan"), device=dev, dtype=dtype) for t in (q, k))
    got = qk_norm_rope_triton(q, k, qw, kw, pos, cache, 1e-6, q_out=q_out, k_out=k_out)
    want = reference.qk_norm_rope(q.float(), k.float(), qw.float(), kw.float(), pos, cache.float(), 1e-6)
    assert max(_err(a, b) for a, b in zip(got, want)) < 1e-2


@pytest.mark.parametrize("T", [2, 4])  # each decode path of the norm ops (_linear_paths.linear_path)
def test_cuda_graph_capture_and_replay(T):
    """vLLM captures decode in CUDA graphs: the ops must capture and replay on new inputs."""
    H, hq, hk, I = SHAPES[0]
    dt, dev = torch.bfloat16, "cuda"
    x, res = torch.randn(T, H, device=dev, dtype=dt), torch.randn(T, H, device=dev, dtype=dt)
    nw = torch.ones(H, device=dev, dtype=dt)
    w = (torch.randn((hq + 2 * hk) * D, H, device=dev) * H**-0.5).to(dt)
    gu = (torch.randn(2 * I, H, device=dev) * H**-0.5).to(dt)
    pos = torch.arange(T, device=dev)
    cache = _cos_sin_cache(64, D).to(dev, dt)

    def step():
        qkv, r = ops.rms_norm_linear(x, nw, w, 1e-6, residual=res)
        q, k, _ = qkv.split([hq * D, hk * D, hk * D], -1)
        q, k = ops.qk_norm_rope(q, k, nw[:D], nw[:D], pos, cache, 1e-6)
        h, r = ops.rms_norm_linear_silu_mul(q[:, :H], nw, gu, 1e-6, residual=r)
        return h, r, k

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        res.copy_(torch.randn_like(res))
        g.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, step()):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("T", [1, 5, 16, 40])
def test_fused_kernels_write_every_element(T, dtype, tol):
    """Odd sizes, poisoned outputs, and the fp32 path (ieee dot): every element written, right values."""
    from vllm_mirage.ops._norm_gemv import norm_gemv, silu_mul_triton
    from vllm_mirage.ops._row_gemv import fits, row_gemv

    dev, H, N = "cuda", 1000, 2 * 760
    x, res = torch.randn(T, H, device=dev, dtype=dtype), torch.randn(T, H, device=dev, dtype=dtype)
    nw = (1 + 0.3 * torch.randn(H, device=dev)).to(dtype)
    w = (torch.randn(N, H, device=dev) * H**-0.5).to(dtype)
    d = lambda *ts: [t.double() for t in ts]  # noqa: E731
    for silu in (False, True):
        n_out = N // 2 if silu else N
        out = torch.full((T, n_out), float("nan"), device=dev, dtype=dtype)
        new_res = torch.full((T, H), float("nan"), device=dev, dtype=dtype)
        ref_fn = reference.rms_norm_linear_silu_mul if silu else reference.rms_norm_linear
        ref_out, ref_res = ref_fn(*d(x, nw, w), 1e-6, residual=res.double())
        for kernel in (norm_gemv, row_gemv) if fits(T, H) else (norm_gemv,):
            out.fill_(float("nan"))
            new_res.fill_(float("nan"))
            kernel(x, w, nw, 1e-6, residual=res, silu_mul=silu, out=out, new_residual=new_res)
            assert _err(out, ref_out) < tol and _err(new_res, ref_res) < tol, kernel.__name__
    y = torch.randn(T, N, device=dev, dtype=dtype)
    out = torch.full((T, N // 2), float("nan"), device=dev, dtype=dtype)
    silu_mul_triton(y, out=out)
    g, u = y.double().chunk(2, -1)
    assert _err(out, torch.nn.functional.silu(g) * u) < tol


def test_dispatch_counts_triton_on_cuda():
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    before = ops.dispatch_counts[("add_rms_norm", "triton")]
    ops.add_rms_norm(x, x, torch.ones(64, device="cuda", dtype=torch.bfloat16), 1e-6)
    assert ops.dispatch_counts[("add_rms_norm", "triton")] == before + 1

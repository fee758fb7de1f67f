"""Every op is opaque to torch.compile (fake impls give the right shapes), so vLLM's Dynamo pass
traces the model without graph breaks."""

import torch

from tests.ops.conftest import randn
from vllm_mirage import ops


def _layer(x, residual, nw, qkv_w, qw, kw, pos, cache, gu_w):
    qkv, residual = ops.rms_norm_linear(x, nw, qkv_w, 1e-6, residual=residual)
    q, k, v = qkv.split([128, 64, 64], dim=-1)
    q, k = ops.qk_norm_rope(q, k, qw, kw, pos, cache, 1e-6)
    h, residual = ops.rms_norm_linear_silu_mul(q, nw[:128], gu_w, 1e-6, residual=residual[:, :128])
    first = ops.rms_norm_linear(x, nw, qkv_w, 1e-6)
    normed, _ = ops.add_rms_norm(x, x, nw, 1e-6)
    return h, residual, k, v, first, normed, ops.linear_silu_mul(h, gu_w[:, :96])


def test_fullgraph_compile_matches_eager():
    torch._dynamo.reset()
    T, H = 3, 128
    args = (
        randn(T, H, dtype=torch.float32), randn(T, H, dtype=torch.float32), 1 + 0.1 * torch.randn(H),
        randn(256, H, dtype=torch.float32, scale=0.1), torch.randn(64), torch.randn(64),
        torch.arange(T), torch.randn(32, 64), randn(192, 128, dtype=torch.float32, scale=0.1),
    )
    eager = _layer(*args)
    compiled = torch.compile(_layer, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)

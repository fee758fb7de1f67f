import pytest
import torch

from tests.ops.conftest import assert_close, poisoned, randn
from vllm_mirage import ops
from vllm_mirage.ops import reference
from vllm_mirage.ops.qk_norm_rope import qk_norm_rope_triton


def _cos_sin_cache(max_pos, D, base=1e6):
    # vLLM's layout: [max_pos, D], cos for the D/2 frequencies then sin.
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float) / D)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _inputs(T, hq, hk, D, dtype):
    # q and k as vLLM gets them: row-strided views into one fused qkv tensor.
    qkv = randn(T, (hq + 2 * hk) * D, dtype=dtype)
    q, k, _ = qkv.split([hq * D, hk * D, hk * D], dim=-1)
    weights = [(1 + 0.3 * torch.randn(D)).to(dtype) for _ in range(2)]
    return q, k, *weights, torch.randint(0, 4096, (T,)), _cos_sin_cache(4096, D).to(dtype)


def _ref64(q, k, qw, kw, pos, cache):
    return reference.qk_norm_rope(q.double(), k.double(), qw.double(), kw.double(), pos, cache.double(), 1e-6)


# Head counts per rank: Qwen3-0.6B (16 q / 8 kv) at TP 1, 2, 8, and 8B (32/8) at TP 4; then a head dim
# that is not a power of two (96), which runs masked over the next power-of-two block.
HEADS = [(16, 8, 128), (8, 4, 128), (2, 1, 128), (8, 2, 128), (4, 2, 64)]
CASES = [(T, *heads) for T in (1, 5, 33) for heads in HEADS] + [(1, 4, 2, 96), (5, 4, 2, 96)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,hq,hk,D", CASES)
def test_matches_reference(T, hq, hk, D, dtype, triton_calls):
    q, k, qw, kw, pos, cache = _inputs(T, hq, hk, D, dtype)
    q_in, k_in = q.clone(), k.clone()
    q_out, k_out = ops.qk_norm_rope(q, k, qw, kw, pos, cache, 1e-6)
    ref_q, ref_k = _ref64(q, k, qw, kw, pos, cache)
    assert_close(q_out, ref_q, dtype)
    assert_close(k_out, ref_k, dtype)
    assert torch.equal(q, q_in) and torch.equal(k, k_in), "inputs must not be modified"
    triton_calls("qk_norm_rope")


@pytest.mark.parametrize("D", [128, 96])
def test_writes_every_element(D):
    q, k, qw, kw, pos, cache = _inputs(6, 4, 2, D, torch.float32)
    q_out, k_out = poisoned(q.shape, torch.float32), poisoned(k.shape, torch.float32)
    qk_norm_rope_triton(q, k, qw, kw, pos, cache, 1e-6, q_out=q_out, k_out=k_out)
    ref_q, ref_k = _ref64(q, k, qw, kw, pos, cache)
    assert_close(q_out, ref_q, torch.float32)
    assert_close(k_out, ref_k, torch.float32)


def test_position_matters():
    q, k, qw, kw, pos, cache = _inputs(3, 2, 1, 64, torch.float32)
    q_out, _ = ops.qk_norm_rope(q, k, qw, kw, pos + 1, cache, 1e-6)
    with pytest.raises(AssertionError):
        assert_close(q_out, _ref64(q, k, qw, kw, pos, cache)[0], torch.float32)

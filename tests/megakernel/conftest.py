"""Megakernel tests: the task graph and its CPU executor on any machine, the persistent kernel in
Triton's interpreter with one worker (programs run one after another there, so several workers would
spin forever), and with every SM on a GPU (``-m gpu``)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before vllm_mirage.ops is imported: see tests/ops/conftest.py

from vllm_mirage.megakernel.state import DecodeBatch, DecodeWeights  # noqa: E402


def rope_cache(max_pos: int, d: int, theta: float = 10000.0, dtype=torch.float32, device="cpu"):
    """vLLM's neox cos_sin_cache: [max_pos, D], cos half then sin half."""
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype=dtype, device=device)


def random_weights(*, hidden, inter, hq, hkv, d, layers, vocab, dtype, device="cpu", seed=0) -> DecodeWeights:
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale: (scale * torch.randn(*s, generator=gen)).to(dtype=dtype, device=device)  # noqa: E731
    norm = lambda n: (1 + 0.3 * torch.randn(n, generator=gen)).to(dtype=dtype, device=device)  # noqa: E731
    return DecodeWeights(
        input_norm=[norm(hidden) for _ in range(layers)],
        qkv=[rnd((hq + 2 * hkv) * d, hidden, scale=hidden ** -0.5) for _ in range(layers)],
        q_norm=[norm(d) for _ in range(layers)],
        k_norm=[norm(d) for _ in range(layers)],
        o=[rnd(hidden, hq * d, scale=(hq * d) ** -0.5) for _ in range(layers)],
        post_norm=[norm(hidden) for _ in range(layers)],
        gate_up=[rnd(2 * inter, hidden, scale=hidden ** -0.5) for _ in range(layers)],
        down=[rnd(hidden, inter, scale=inter ** -0.5) for _ in range(layers)],
        final_norm=norm(hidden),
        lm_head=rnd(vocab, hidden, scale=hidden ** -0.5),
        cos_sin_cache=rope_cache(256, d, device=device),
        eps=1e-6,
    )


def random_batch(positions, *, layers, hkv, d, dtype, block_size=16, num_blocks=32, device="cpu", seed=1) -> DecodeBatch:
    """Caches hold random keys/values for every earlier position; blocks are handed out shuffled, as
    vLLM's allocator does after a while, so a wrong block-table lookup reads the wrong tokens."""
    gen = torch.Generator().manual_seed(seed)
    per_request = max(p // block_size + 1 for p in positions)
    order = torch.randperm(num_blocks, generator=gen)[: len(positions) * per_request]
    tables = order.view(len(positions), per_request).to(torch.int32)
    caches = [torch.randn(2, num_blocks, block_size, hkv, d, generator=gen).to(dtype) for _ in range(layers)]
    return DecodeBatch(
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        block_tables=tables.to(device),
        kv_caches=[c.to(device) for c in caches],
    )


# A tiny rank: GQA group 2, sizes that do not divide the tiles (I, V), a 16-token KV block.
TINY = dict(hidden=128, inter=200, hq=4, hkv=2, d=32, layers=2, vocab=300)

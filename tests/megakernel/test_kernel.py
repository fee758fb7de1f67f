"""The persistent kernel against the layerwise reference, in Triton's interpreter (one worker)."""

import copy

import pytest
import torch

from tests.megakernel.conftest import TINY, random_batch, random_weights
from vllm_mirage.megakernel import kernel, reference
from vllm_mirage.megakernel.graph import build_task_graph
from vllm_mirage.megakernel.state import DecodeBuffers

# ‖out − ref‖/‖ref‖. bf16 is looser in the interpreter, which truncates fp32→bf16 (tests/ops/conftest.py),
# here at every rounding point of two layers.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _poison(buffers):
    for t in (buffers.x[1:], buffers.res_mlp[1:], buffers.res_attn, buffers.qkv, buffers.attn, buffers.o,
              buffers.act, buffers.logits, buffers.hidden_out):
        if t is not None:
            t.fill_(float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions, lm_head", [([0], True), ([5, 37, 16], True), ([9, 40], False)])
def test_kernel_matches_reference(positions, lm_head, dtype):
    weights = random_weights(**TINY, dtype=dtype)
    batch = random_batch(positions, layers=TINY["layers"], hkv=TINY["hkv"], d=TINY["d"], dtype=dtype)
    hidden = torch.randn(len(positions), TINY["hidden"]).to(dtype)
    want_batch = copy.copy(batch)
    want_batch.kv_caches = [c.clone() for c in batch.kv_caches]
    # The reference in float32 on the same (rounded) inputs: both sides' own rounding shows as error.
    f32 = lambda w: w.float() if isinstance(w, torch.Tensor) else [t.float() for t in w]  # noqa: E731
    weights32 = copy.copy(weights)
    for name in weights.TABLE + ("final_norm", "lm_head"):
        setattr(weights32, name, f32(getattr(weights, name)))
    want_batch.kv_caches = [c.float() for c in want_batch.kv_caches]
    want = reference.decode_step(weights32, want_batch, hidden.float(), lm_head)

    shape = weights.shape(batch=len(positions), lm_head=lm_head)
    graph = build_task_graph(shape, 1)
    buffers = DecodeBuffers(shape, dtype, "cpu")
    _poison(buffers)
    buffers.load_input(hidden)
    logits = kernel.decode_step(graph, weights, batch, buffers)

    assert logits.shape == want.shape and not logits.isnan().any(), "unwritten output"
    assert _rel(logits, want) <= TOLERANCE[dtype], _rel(logits, want)
    assert buffers.counters.tolist() == graph.stage_counts.tolist()  # every task signalled once
    for layer, (got, ref) in enumerate(zip(batch.kv_caches, want_batch.kv_caches)):
        for b, pos in enumerate(positions):
            block = batch.block_tables[b, pos // 16]
            new = got[:, block, pos % 16].float()
            assert _rel(new, ref[:, block, pos % 16]) <= TOLERANCE[dtype], (layer, b)
        # Only the new tokens' slots were written.
        changed = (got.float() != want_batch.kv_caches[layer].to(dtype).float()).any(dim=(0, 3, 4))
        written = {(int(batch.block_tables[b, p // 16]), p % 16) for b, p in enumerate(positions)}
        assert set(map(tuple, changed.nonzero().tolist())) <= written


def test_unsupported_shapes_are_refused():
    weights = random_weights(**TINY, dtype=torch.float32)
    batch = random_batch([3], layers=TINY["layers"], hkv=TINY["hkv"], d=TINY["d"], dtype=torch.float32,
                         block_size=8)
    shape = weights.shape(batch=1)
    with pytest.raises(ValueError, match="block size 8"):
        kernel.decode_step(build_task_graph(shape, 1), weights, batch, DecodeBuffers(shape, torch.float32, "cpu"))

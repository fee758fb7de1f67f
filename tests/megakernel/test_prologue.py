"""The step's prologue kernel (embedding rows, sums of squares, zeroed counters) against its reference,
in Triton's interpreter on CPU and compiled with ``-m gpu``."""

import pytest
import torch

from tests.megakernel.conftest import TINY
from vllm_mirage.megakernel import prologue
from vllm_mirage.megakernel.graph import DecodeShape
from vllm_mirage.megakernel.state import DecodeBuffers


def _buffers(batch, hidden, block_n_out, fused_down, dtype, device):
    shape = DecodeShape(hidden=hidden, intermediate=TINY["inter"], num_heads=TINY["hq"],
                        num_kv_heads=TINY["hkv"], head_dim=TINY["d"], num_layers=TINY["layers"],
                        vocab=TINY["vocab"], batch=batch, block_n_out=block_n_out, attn_splits=2,
                        lm_head=False, fused_down=fused_down)
    buffers = DecodeBuffers(shape, dtype, device)
    # What the previous step left behind: the prologue must overwrite or zero all of it.
    buffers.res.fill_(float("nan"))
    buffers.sumsq.fill_(float("nan"))
    buffers.sync.fill_(7)
    return buffers


def _check(batch, hidden, block_n_out, fused_down, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    embedding = torch.randn(TINY["vocab"], hidden, generator=gen, device=device).to(dtype)
    ids = torch.randint(0, TINY["vocab"], (batch,), generator=gen, device=device)
    got, want = (_buffers(batch, hidden, block_n_out, fused_down, dtype, device) for _ in range(2))
    got_steps, want_steps = (torch.full((), 41, dtype=torch.int64, device=device) for _ in range(2))
    prologue.load_step_input(got, ids, embedding, got_steps)
    prologue.load_step_input_reference(want, ids, embedding, want_steps)
    assert torch.equal(got.res[0], want.res[0])
    torch.testing.assert_close(got.sumsq[0], want.sumsq[0], rtol=1e-5, atol=0)
    assert int(got.sync.abs().sum()) == 0
    assert int(got_steps) == int(want_steps) == 42
    return got.sync.numel()


@pytest.mark.parametrize("batch, hidden, block_n_out, fused_down", [
    (1, 128, 16, False),  # 8 column tiles: the first holds the row's sum, seven zeros
    # A row narrower than its block (640 of 1024); with the fixed-point DOWN sums, 3 programs zero 4 blocks
    # of counters.
    (3, 640, 32, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prologue_matches_reference(batch, hidden, block_n_out, fused_down, dtype):
    counters = _check(batch, hidden, block_n_out, fused_down, dtype, "cpu")
    assert fused_down == (counters > batch * prologue._SYNC_BLOCK)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 2, 16])
def test_prologue_on_gpu_at_qwen3_8b_width(batch):
    _check(batch, 4096, 32, batch <= 2, torch.bfloat16, "cuda")

"""A decode step's input in one launch: the token embeddings, their sums of squares, zeroed counters.

Before the persistent kernel can run, the step needs the embedded tokens in the residual's first slot,
each row's sum of squares in the first column tile of ``sumsq[0]`` (the other tiles zero: layer 0's
input norm adds them all), and the stage counters, head arrivals and fixed-point DOWN sums at zero
(``DecodeBuffers.sync``). As PyTorch ops that is about nine kernels in the step's CUDA graph (the
embedding, a copy, the cast, square and sum, two fills, the step count), each a node with its own
launch latency on the GPU's critical path; here it is one. :func:`load_step_input_reference` is the
same in PyTorch, and what the CPU path runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_mirage.megakernel.state import DecodeBuffers

_SYNC_BLOCK = 1024


@triton.jit
def _prologue_kernel(ids_ptr, embed_ptr, embed_stride, res_ptr, sumsq_ptr, sync_ptr, n_sync, steps_ptr,
                     B, H, NT, BLOCK_H: tl.constexpr, NT_P2: tl.constexpr, SYNC_BLOCK: tl.constexpr):
    b = tl.program_id(0)
    token = tl.load(ids_ptr + b).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    x = tl.load(embed_ptr + token * embed_stride + cols, mask=cols < H, other=0.0)
    tl.store(res_ptr + b * H + cols, x, mask=cols < H)
    xf = x.to(tl.float32)
    tiles = tl.arange(0, NT_P2)
    tl.store(sumsq_ptr + tiles * B + b, tl.where(tiles == 0, tl.sum(xf * xf, axis=0), 0.0), mask=tiles < NT)
    # The counters are shared by every row: each program zeroes every B-th block of them.
    for start in range(b * SYNC_BLOCK, n_sync, B * SYNC_BLOCK):
        offs = start + tl.arange(0, SYNC_BLOCK)
        tl.store(sync_ptr + offs, tl.zeros([SYNC_BLOCK], dtype=tl.int32), mask=offs < n_sync)
    if b == 0:
        tl.store(steps_ptr, tl.load(steps_ptr) + 1)


def load_step_input(buffers: DecodeBuffers, input_ids: torch.Tensor, embedding: torch.Tensor,
                    steps: torch.Tensor) -> None:
    """Prepare ``buffers`` for a step of the tokens ``input_ids`` [B] (rows of ``embedding`` [V, H], vLLM's
    embedding weight at tensor-parallel size 1) and add one to the int64 counter ``steps``."""
    B, H = buffers.res.shape[1:]
    tiles = buffers.sumsq.shape[1]
    assert input_ids.shape == (B,) and embedding.shape[1] == H and embedding.stride(1) == 1
    _prologue_kernel[(B,)](
        input_ids, embedding, embedding.stride(0), buffers.res[0], buffers.sumsq[0], buffers.sync,
        buffers.sync.numel(), steps, B, H, tiles,
        BLOCK_H=triton.next_power_of_2(H), NT_P2=triton.next_power_of_2(tiles), SYNC_BLOCK=_SYNC_BLOCK,
        num_warps=4,
    )


def load_step_input_reference(buffers: DecodeBuffers, input_ids: torch.Tensor, embedding: torch.Tensor,
                              steps: torch.Tensor) -> None:
    buffers.load_input(torch.nn.functional.embedding(input_ids, embedding))
    buffers.sync.zero_()
    steps.add_(1)

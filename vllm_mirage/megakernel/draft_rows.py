"""The rows of a self-draft step, one position ahead of where vLLM's EAGLE speculator puts them.

EAGLE hands its draft token ``i + 1`` at position ``i``. A draft that *is* the target (same weights) and
shares the target's KV cache computes what the target would for that token by running it at its true
position ``i + 1`` over the cache's ``i + 1`` earlier tokens, and storing its key and value at the slot of
position ``i + 1``: a decode row of the megakernel. That slot is at or past the first token the verify
pass has not accepted (the target rewrites it before reading it) or holds an accepted token, which the row
rewrites with its own computation of the same values, as the one-token megakernel mode writes every
decode token's.

A step's rows, each a request's token: all of them when every request brings at most ``max_query_len``
tokens (draft steps, and the catch-up over a verify pass: vLLM does not tell the model which of its
tokens was accepted last), or only each request's last token (the catch-up over prefill chunks). A step
may take more rows than it has tokens or requests (the bridge rounds row counts up). Rows past the step's
real tokens (CUDA-graph padding, rounding) and rows whose position would pass the rotary table store
nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COPY = 256  # block-table entries per load
MAX_REQUESTS = 64  # a step's requests, padded ones included, that a row looks its request up among


# Sizes are not specialised on (divisibility by 16, equality to 1): each specialisation is a compile, and
# vLLM's warm-up cannot reach every one before serving.
@triton.jit(do_not_specialize=["bt_stride", "num_reqs", "max_position", "bt_out_stride", "trash_row"])
def _draft_rows_kernel(ids_ptr, pos_ptr, qsl_ptr, bt_ptr, bt_stride, num_reqs, max_position,
                       ids_out, pos_out, slot_out, bt_out, bt_out_stride, row_out, trash_row,
                       PAGE: tl.constexpr, LAST_ONLY: tl.constexpr, REQS_P2: tl.constexpr, COPY: tl.constexpr):
    r = tl.program_id(0)
    reqs = tl.arange(0, REQS_P2)
    ends = tl.load(qsl_ptr + 1 + reqs, mask=reqs < num_reqs, other=2**30)
    total = tl.load(qsl_ptr + num_reqs)  # real tokens: padded requests end where the last real one does
    if LAST_ONLY:
        req = tl.minimum(r, num_reqs - 1)
        t = tl.load(qsl_ptr + req + 1) - 1
        real = (t >= tl.load(qsl_ptr + req)) & (r < num_reqs)
    else:
        t = r
        req = tl.sum((ends <= t).to(tl.int32))
        real = t < total
    t = tl.minimum(tl.maximum(t, 0), trash_row - 1)  # rows past the step's tokens read its last one
    pos = tl.load(pos_ptr + t).to(tl.int64) + 1
    real = real & (pos < max_position)
    pos = tl.where(real, pos, 0)  # a padding row attends to itself only
    tl.store(ids_out + r, tl.load(ids_ptr + t))
    tl.store(pos_out + r, pos)
    tl.store(row_out + r, tl.where(real, t, trash_row).to(tl.int64))
    row = bt_ptr + req.to(tl.int64) * bt_stride
    block = tl.load(row + pos // PAGE, mask=real, other=0)
    tl.store(slot_out + r, tl.where(real, block.to(tl.int64) * PAGE + pos % PAGE, -1))
    last_block = tl.where(real, pos // PAGE, -1)
    for j0 in range(0, last_block + 1, COPY):
        j = j0 + tl.arange(0, COPY)
        m = j <= last_block
        tl.store(bt_out + r * bt_out_stride + j, tl.load(row + j, mask=m, other=0), mask=m)


class DraftRows:
    """The rows' tensors for steps of ``n`` rows, allocated once (CUDA graphs replay fixed addresses).

    ``ids``, ``positions`` (true positions: EAGLE's plus one), ``slots`` (< 0: store nothing),
    ``block_tables`` (each row's request's table, the blocks up to its position) and ``rows``: the step's
    token each row is, where its hidden state goes; padding rows point past the step's last token.
    """

    def __init__(self, n: int, max_blocks: int, ids_dtype: torch.dtype, device):
        self.ids = torch.zeros(n, dtype=ids_dtype, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.rows = torch.zeros(n, dtype=torch.int64, device=device)

    def fill(self, input_ids, positions, query_start_loc, block_table, block_size: int, max_position: int,
             last_only: bool) -> None:
        """Rows of the step whose tokens are ``input_ids``/``positions`` [T] (EAGLE's), requests
        ``query_start_loc`` [R + 1] (padded requests repeat the last end) with tables ``block_table`` [R, *]."""
        n, num_reqs = self.ids.shape[0], query_start_loc.shape[0] - 1
        assert n >= (num_reqs if last_only else positions.shape[0]) and num_reqs <= MAX_REQUESTS
        _draft_rows_kernel[(n,)](
            input_ids, positions, query_start_loc, block_table, block_table.stride(0), num_reqs, max_position,
            self.ids, self.positions, self.slots, self.block_tables, self.block_tables.stride(0), self.rows,
            positions.shape[0], PAGE=block_size, LAST_ONLY=last_only,
            REQS_P2=MAX_REQUESTS, COPY=_COPY, num_warps=1,
        )

    def fill_reference(self, input_ids, positions, query_start_loc, block_table, block_size: int,
                       max_position: int, last_only: bool) -> None:
        """What :meth:`fill` computes, in PyTorch (host loops: for tests)."""
        qsl = query_start_loc.tolist()
        total = qsl[-1]
        num_reqs, tokens = len(qsl) - 1, positions.shape[0]
        for r in range(self.ids.shape[0]):
            if last_only:
                req = min(r, num_reqs - 1)
                t = qsl[req + 1] - 1
                real = t >= qsl[req] and r < num_reqs
            else:
                t = r
                req, real = sum(end <= t for end in qsl[1:]), t < total
            t = min(max(t, 0), tokens - 1)
            pos = int(positions[t]) + 1
            real = real and pos < max_position
            pos = pos if real else 0
            self.ids[r] = input_ids[t]
            self.positions[r] = pos
            self.rows[r] = t if real else positions.shape[0]
            self.slots[r] = int(block_table[req, pos // block_size]) * block_size + pos % block_size if real else -1
            if real:
                blocks = pos // block_size + 1
                self.block_tables[r, :blocks] = block_table[req, :blocks]

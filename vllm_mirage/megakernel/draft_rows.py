"""The rows of a self-draft step, one position ahead of where vLLM's EAGLE speculator puts them.

EAGLE hands its draft token ``i + 1`` at position ``i``. A draft that *is* the target (same weights) and
shares the target's KV cache computes what the target would for that token by running it at its true
position ``i + 1`` over the cache's ``i + 1`` earlier tokens, and storing its key and value at the slot of
position ``i + 1``: a decode row of the megakernel.

Only one token per request needs a row: the last one EAGLE handed over for real, whose logits give the
next draft (every earlier token is one the target's verify or prefill pass already cached). vLLM does not
say which one it is, and the tokens after it are not to be trusted: vLLM 0.26's V2 speculator leaves the
entries of rejected drafts as earlier steps wrote them, tokens and positions of this or another request.
It is found from the target's own input ids of the step: EAGLE hands over the target's tokens shifted by
one (token ``j + 1`` at index ``j``) up to the last real index, where it puts the token sampled after the
verify pass. Within a request the last real index is therefore the first ``j`` whose token differs from
the target's token ``j + 1``, or the request's last index: a token sampled after a rejected draft always
differs from that draft (greedy: it is the target's argmax, which the draft was not; sampled: vLLM's
rejection sampler draws it where the draft's token has no mass). A chunk of a prompt hands over its shifted
tokens and the next one, so its row is its last token.

A step's rows are padded past its requests (the bridge rounds row counts up); padding rows, requests
without tokens, rows whose positions do not follow the request's first (not a real entry) and rows whose
position would pass the rotary table store nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COPY = 256  # block-table entries (and request tokens) per load


# Sizes are not specialised on (divisibility by 16, equality to 1): each specialisation is a compile, and
# vLLM's warm-up cannot reach every one before serving.
@triton.jit(do_not_specialize=["bt_stride", "num_reqs", "max_position", "bt_out_stride", "trash_row"])
def _draft_rows_kernel(ids_ptr, target_ids_ptr, pos_ptr, qsl_ptr, bt_ptr, bt_stride, num_reqs, max_position,
                       ids_out, pos_out, slot_out, bt_out, bt_out_stride, row_out, trash_row,
                       PAGE: tl.constexpr, COPY: tl.constexpr):
    r = tl.program_id(0)
    req = tl.minimum(r, num_reqs - 1)
    start = tl.load(qsl_ptr + req)
    end = tl.load(qsl_ptr + req + 1)
    last = end - 1
    for j0 in range(start, end - 1, COPY):  # the first token that is not the target's next one
        j = j0 + tl.arange(0, COPY)
        m = j < end - 1
        differs = m & (tl.load(ids_ptr + j, mask=m, other=0) != tl.load(target_ids_ptr + j + 1, mask=m, other=0))
        last = tl.minimum(last, tl.min(tl.where(differs, j, end - 1), axis=0))
    t = tl.minimum(tl.maximum(last, 0), trash_row - 1)
    first_pos = tl.load(pos_ptr + tl.minimum(start, trash_row - 1)).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    real = (r < num_reqs) & (end > start) & (pos == first_pos + (t - start)) & (pos + 1 < max_position)
    pos = tl.where(real, pos + 1, 0)  # a padding row attends to itself only
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
    """The rows' tensors for steps of up to ``n`` requests, allocated once (CUDA graphs replay fixed
    addresses).

    ``ids``, ``positions`` (true positions: EAGLE's plus one), ``slots`` (< 0: store nothing),
    ``block_tables`` (each row's request's table, the blocks up to its position) and ``rows``: the step's
    token each row is, where its hidden state goes; rows that store nothing point past the step's last token.
    """

    def __init__(self, n: int, max_blocks: int, ids_dtype: torch.dtype, device):
        self.ids = torch.zeros(n, dtype=ids_dtype, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.rows = torch.zeros(n, dtype=torch.int64, device=device)

    def fill(self, input_ids, target_ids, positions, query_start_loc, block_table, block_size: int,
             max_position: int) -> None:
        """Rows of the step whose tokens are ``input_ids``/``positions`` [T] (EAGLE's), the target's input ids
        of the same step ``target_ids`` [>= T], requests ``query_start_loc`` [R + 1] (padded requests repeat
        the last end) with tables ``block_table`` [R, *]."""
        n, num_reqs = self.ids.shape[0], query_start_loc.shape[0] - 1
        assert n >= num_reqs and target_ids.shape[0] >= positions.shape[0]
        _draft_rows_kernel[(n,)](
            input_ids, target_ids, positions, query_start_loc, block_table, block_table.stride(0), num_reqs,
            max_position, self.ids, self.positions, self.slots, self.block_tables, self.block_tables.stride(0),
            self.rows, positions.shape[0], PAGE=block_size, COPY=_COPY, num_warps=1,
        )

    def fill_reference(self, input_ids, target_ids, positions, query_start_loc, block_table, block_size: int,
                       max_position: int) -> None:
        """What :meth:`fill` computes, in PyTorch (host loops: for tests and CPU engines)."""
        qsl, tokens = query_start_loc.tolist(), positions.shape[0]
        num_reqs = len(qsl) - 1
        for r in range(self.ids.shape[0]):
            req = min(r, num_reqs - 1)
            start, end = qsl[req], qsl[req + 1]
            last = next((j for j in range(start, end - 1) if int(input_ids[j]) != int(target_ids[j + 1])), end - 1)
            t = min(max(last, 0), tokens - 1)
            pos = int(positions[t])
            real = (r < num_reqs and end > start and pos == int(positions[min(start, tokens - 1)]) + t - start
                    and pos + 1 < max_position)
            pos = pos + 1 if real else 0
            self.ids[r] = input_ids[t]
            self.positions[r] = pos
            self.rows[r] = t if real else tokens
            self.slots[r] = int(block_table[req, pos // block_size]) * block_size + pos % block_size if real else -1
            if real:
                blocks = pos // block_size + 1
                self.block_tables[r, :blocks] = block_table[req, :blocks]

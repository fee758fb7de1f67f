"""Self-draft rows (``megakernel/draft_rows.py``): the row kernel against its reference (Triton's
interpreter on CPU, compiled with ``-m gpu``), and what the rows are for: a draft token run one position
ahead over a cache of the target's tokens decodes as the target's own one-token step does."""

import pytest
import torch

from tests.megakernel.conftest import TINY, decode_token, random_weights
from vllm_mirage.megakernel import reference
from vllm_mirage.megakernel.draft_rows import DraftRows
from vllm_mirage.megakernel.state import DecodeBatch

BLOCK = 16


def _step(query_lens, padded_requests, device):
    """A step's EAGLE inputs: requests of ``query_lens`` tokens at random positions, ``padded_requests``
    more as a CUDA graph pads them (they end where the last real one does), two stale padding tokens."""
    gen = torch.Generator().manual_seed(sum(query_lens))
    ends = torch.tensor(query_lens).cumsum(0)
    qsl = torch.cat([torch.zeros(1, dtype=torch.int64), ends, ends[-1:].repeat(padded_requests)])
    tokens = int(ends[-1]) + 2
    starts = torch.randint(0, 90, (len(query_lens),), generator=gen)
    positions = torch.cat([s + torch.arange(n) for s, n in zip(starts, query_lens)] + [torch.tensor([5, 7])])
    ids = torch.randint(0, 1000, (tokens,), generator=gen, dtype=torch.int32)
    requests = len(query_lens) + padded_requests
    tables = torch.randperm(64 * requests, generator=gen).view(requests, 64).to(torch.int32)
    return [t.to(device) for t in (ids, positions, qsl.to(torch.int32), tables)]


def _check_rows(query_lens, padded_requests, last_only, max_position, device, extra_rows=0):
    ids, positions, qsl, tables = _step(query_lens, padded_requests, device)
    n = (qsl.shape[0] - 1 if last_only else ids.shape[0]) + extra_rows
    got, want = DraftRows(n, tables.shape[1], ids.dtype, device), DraftRows(n, tables.shape[1], ids.dtype, "cpu")
    got.fill(ids, positions, qsl, tables, BLOCK, max_position, last_only)
    want.fill_reference(ids.cpu(), positions.cpu(), qsl.cpu(), tables.cpu(), BLOCK, max_position, last_only)
    for name in ("ids", "positions", "slots", "rows", "block_tables"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name)), name
    return want


@pytest.mark.parametrize("query_lens, padded_requests, last_only, extra_rows", [
    ([4, 4, 4], 1, False, 0),  # a catch-up over verify passes of 3 drafts each, one padded request
    ([1, 1, 1, 1, 1], 0, False, 0),  # a draft step
    ([37, 4, 1], 2, True, 0),  # a prefill chunk among decodes: each request's last token
    ([4, 4, 4], 0, False, 2),  # rounded up to 16 rows (the bridge's row counts are powers of two)
    ([1, 1, 1, 1, 1], 0, False, 3),
    ([37, 4, 1], 2, True, 3),
])
def test_rows_kernel_matches_reference(query_lens, padded_requests, last_only, extra_rows):
    want = _check_rows(query_lens, padded_requests, last_only, max_position=1 << 20, device="cpu",
                       extra_rows=extra_rows)
    real = want.slots >= 0
    # Every real token is a row, one position ahead; the padding tokens store nothing.
    assert int(real.sum()) == (len(query_lens) if last_only else sum(query_lens))
    assert set(want.rows[real].tolist()).isdisjoint(set(want.rows[~real].tolist()))


def test_rows_past_the_rotary_table_store_nothing():
    want = _check_rows([4], 0, False, max_position=40, device="cpu")
    _, positions, _, _ = _step([4], 0, "cpu")
    ahead = positions[:4] + 1
    assert torch.equal(want.slots[:4] >= 0, ahead < 40)


@pytest.mark.gpu
def test_rows_kernel_on_gpu():
    _check_rows([4, 4, 4, 4], 3, False, 1 << 20, "cuda")
    _check_rows([100, 4, 1], 1, True, 1 << 20, "cuda")
    _check_rows([4, 4, 4], 0, False, 1 << 20, "cuda", extra_rows=2)
    _check_rows([100, 4, 1], 1, True, 1 << 20, "cuda", extra_rows=4)


def test_rows_ahead_decode_as_the_target_does():
    """A sequence decoded token by token fills the cache (the target's); then a catch-up over the last
    three tokens, EAGLE-shifted, runs as rows ahead: each row's logits are those the target's own step gave
    for the token it holds, and so is a draft step after it, over the key the catch-up stored."""
    torch.manual_seed(0)
    weights = random_weights(**TINY, dtype=torch.float32)
    caches = tuple([torch.zeros(8, BLOCK, TINY["hkv"], TINY["d"]) for _ in range(TINY["layers"])] for _ in range(2))
    table = torch.tensor([[5, 2, 7, 0]], dtype=torch.int32)
    tokens = torch.randint(0, TINY["vocab"], (24,))
    target_logits = [decode_token(weights, caches, table, pos, token) for pos, token in enumerate(tokens.tolist())]
    # The verify pass ran positions 20..23 (token 20 and three drafts); EAGLE's catch-up hands the draft
    # tokens 21, 22, 23 and the sampled one at positions 20..23.
    sampled, drafted = 17, 230
    target_caches = tuple([c.clone() for c in layer] for layer in caches)
    target_logits += [decode_token(weights, target_caches, table, pos, token) for pos, token in ((24, sampled),
                                                                                              (25, drafted))]

    def draft(ids, positions, qsl):
        rows = DraftRows(len(ids), table.shape[1], torch.int32, "cpu")
        rows.fill_reference(torch.tensor(ids, dtype=torch.int32), torch.tensor(positions), torch.tensor(qsl), table,
                            BLOCK, 256, last_only=False)
        batch = DecodeBatch(rows.positions, rows.block_tables, rows.slots, *caches)
        embedded = torch.nn.functional.embedding(rows.ids.long(), weights.lm_head)
        return reference.decode_step(weights, batch, embedded)

    logits = draft(tokens[21:24].tolist() + [sampled], [20, 21, 22, 23], [0, 4])
    for r, pos in enumerate(range(21, 25)):
        torch.testing.assert_close(logits[r], target_logits[pos], rtol=1e-4, atol=1e-4)
    # The next draft step: EAGLE hands the first draft token at position 24.
    torch.testing.assert_close(draft([drafted], [24], [0, 1])[0], target_logits[25], rtol=1e-4, atol=1e-4)

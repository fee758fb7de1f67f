"""Self-draft rows (``megakernel/draft_rows.py``): the row kernel against its reference (Triton's
interpreter on CPU, compiled with ``-m gpu``), which token of each request becomes the row, and what the rows
are for: a draft token run one position ahead over a cache of the target's tokens decodes as the target's
own one-token step does."""

import pytest
import torch

from tests.megakernel.conftest import TINY, decode_token, random_weights
from vllm_mirage.megakernel import reference
from vllm_mirage.megakernel.draft_rows import DraftRows
from vllm_mirage.megakernel.state import DecodeBatch

BLOCK = 16


def _step(query_lens, last_real, padded_requests, device):
    """A step as vLLM's V2 EAGLE speculator hands it over: each request's target tokens at consecutive
    positions, shifted by one up to the request's last real index ``last_real[r]``, where the token sampled
    after the verify pass goes; past it, stale entries (tokens and positions an earlier step left there);
    ``padded_requests`` more as a CUDA graph pads them, and two stale padding tokens."""
    gen = torch.Generator().manual_seed(sum(query_lens) + sum(last_real))
    ends = torch.tensor(query_lens).cumsum(0)
    qsl = torch.cat([torch.zeros(1, dtype=torch.int64), ends, ends[-1:].repeat(padded_requests)])
    tokens = int(ends[-1]) + 2
    target = torch.randint(0, 1000, (tokens,), generator=gen, dtype=torch.int32)
    positions = torch.randint(0, 90, (tokens,), generator=gen)  # stale unless overwritten below
    ids = torch.randint(0, 1000, (tokens,), generator=gen, dtype=torch.int32)
    for start, n, last in zip(qsl.tolist(), query_lens, last_real):
        first = int(torch.randint(0, 90, (1,), generator=gen))
        positions[start : start + last + 1] = first + torch.arange(last + 1)
        ids[start : start + last] = target[start + 1 : start + last + 1]
        ids[start + last] = 1000 + int(torch.randint(0, 1000, (1,), generator=gen))  # sampled: never a draft
    requests = len(query_lens) + padded_requests
    tables = torch.randperm(64 * requests, generator=gen).view(requests, 64).to(torch.int32)
    return [t.to(device) for t in (ids, target, positions, qsl.to(torch.int32), tables)]


def _check_rows(query_lens, last_real, padded_requests, max_position, device, extra_rows=0):
    ids, target, positions, qsl, tables = _step(query_lens, last_real, padded_requests, device)
    n = qsl.shape[0] - 1 + extra_rows
    got, want = DraftRows(n, tables.shape[1], ids.dtype, device), DraftRows(n, tables.shape[1], ids.dtype, "cpu")
    got.fill(ids, target, positions, qsl, tables, BLOCK, max_position)
    want.fill_reference(ids.cpu(), target.cpu(), positions.cpu(), qsl.cpu(), tables.cpu(), BLOCK, max_position)
    for name in ("ids", "positions", "slots", "rows", "block_tables"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name)), name
    return want, (ids, positions, qsl, tables)


@pytest.mark.parametrize("query_lens, last_real, padded_requests, extra_rows", [
    ([4, 4, 4], [3, 1, 0], 1, 0),  # a catch-up over verify passes of 3 drafts: all, one, none accepted
    ([1, 1, 1, 1, 1], [0, 0, 0, 0, 0], 0, 0),  # a draft step
    ([37, 4, 1], [36, 2, 0], 2, 0),  # a prompt chunk among verify passes
    ([4, 4, 4], [2, 3, 0], 0, 1),  # rounded up to 4 rows (the bridge's row counts are powers of two)
    ([37, 4, 1], [36, 0, 0], 2, 3),
])
def test_each_request_runs_its_last_real_token_one_position_ahead(query_lens, last_real, padded_requests,
                                                                  extra_rows):
    want, (ids, positions, qsl, tables) = _check_rows(query_lens, last_real, padded_requests, 1 << 20, "cpu",
                                                      extra_rows)
    for r, last in enumerate(last_real):
        t = int(qsl[r]) + last
        assert int(want.rows[r]) == t and int(want.ids[r]) == int(ids[t])
        pos = int(positions[t]) + 1
        assert int(want.positions[r]) == pos
        assert int(want.slots[r]) == int(tables[r, pos // BLOCK]) * BLOCK + pos % BLOCK
    # Padded requests and rounding rows store nothing, and their hidden states go past the step's tokens.
    assert (want.slots[len(query_lens):] < 0).all() and (want.rows[len(query_lens):] == ids.shape[0]).all()


def test_rows_past_the_rotary_table_store_nothing():
    want, (_, positions, _, _) = _check_rows([4], [3], 0, 40, "cpu")
    assert (int(want.slots[0]) >= 0) == (int(positions[3]) + 1 < 40)


def test_a_stale_entry_is_never_a_row():
    """A sampled token that happened to equal the target's next token would move the search past the last
    real index, onto an entry an earlier step left: its position does not follow the request's, so it
    stores nothing rather than overwrite a cached token."""
    ids, target, positions, qsl, tables = _step([4], [1], 0, "cpu")
    ids[1] = target[2]  # the search now passes index 1, onto stale entries
    positions[2:4] = torch.tensor([5, 6])
    rows = DraftRows(1, tables.shape[1], ids.dtype, "cpu")
    rows.fill_reference(ids, target, positions, qsl, tables, BLOCK, 1 << 20)
    assert int(rows.slots[0]) == -1
    kernel = DraftRows(1, tables.shape[1], ids.dtype, "cpu")
    kernel.fill(ids, target, positions, qsl, tables, BLOCK, 1 << 20)
    assert int(kernel.slots[0]) == -1


@pytest.mark.gpu
def test_rows_kernel_on_gpu():
    _check_rows([4, 4, 4, 4], [3, 0, 1, 2], 3, 1 << 20, "cuda")
    _check_rows([100, 4, 1], [99, 1, 0], 1, 1 << 20, "cuda", extra_rows=4)


def test_rows_ahead_decode_as_the_target_does():
    """A sequence decoded token by token fills the cache (the target's); then EAGLE's catch-up over a
    verify pass runs as one row ahead: the token sampled after the last accepted draft, whose logits are
    those the target's own step gives for it, with all drafts accepted and with one. So is a draft step
    after it, over the key the catch-up stored."""
    torch.manual_seed(0)
    weights = random_weights(**TINY, dtype=torch.float32)
    caches = tuple([torch.zeros(8, BLOCK, TINY["hkv"], TINY["d"]) for _ in range(TINY["layers"])] for _ in range(2))
    table = torch.tensor([[5, 2, 7, 0]], dtype=torch.int32)
    tokens = torch.randint(0, TINY["vocab"], (24,))
    for pos, token in enumerate(tokens.tolist()):
        decode_token(weights, caches, table, pos, token)
    # The verify pass ran tokens 20..23 (token 20 and three drafts) at positions 20..23.
    target = tokens[20:24].to(torch.int32)

    def draft(ids, positions, qsl, target_ids, on):
        rows = DraftRows(1, table.shape[1], torch.int32, "cpu")
        rows.fill_reference(torch.tensor(ids, dtype=torch.int32), target_ids, torch.tensor(positions),
                            torch.tensor(qsl), table, BLOCK, 256)
        batch = DecodeBatch(rows.positions, rows.block_tables, rows.slots, *on)
        embedded = torch.nn.functional.embedding(rows.ids.long(), weights.lm_head)
        return reference.decode_step(weights, batch, embedded)[0]

    def target_step(on, pos, token):
        return decode_token(weights, on, table, pos, token)

    sampled, drafted = 17, 230
    # Every draft accepted: EAGLE hands over tokens 21, 22, 23 and the sampled one at positions 20..23.
    cache = tuple([c.clone() for c in layer] for layer in caches)
    want = target_step(tuple([c.clone() for c in layer] for layer in caches), 24, sampled)
    torch.testing.assert_close(draft(tokens[21:24].tolist() + [sampled], [20, 21, 22, 23], [0, 4], target, cache),
                               want, rtol=1e-4, atol=1e-4)
    # The next draft step: EAGLE hands the first draft token at position 24, over the key the row stored.
    want_next = target_step(tuple([c.clone() for c in layer] for layer in cache), 25, drafted)
    torch.testing.assert_close(draft([drafted], [24], [0, 1], target, cache), want_next, rtol=1e-4, atol=1e-4)
    # One draft accepted: token 21, then the sampled one at index 1; indices 2 and 3 are stale.
    cache = tuple([c.clone() for c in layer] for layer in caches)
    want = target_step(tuple([c.clone() for c in layer] for layer in caches), 22, sampled)
    torch.testing.assert_close(draft([int(tokens[21]), sampled, 5, 9], [20, 21, 3, 4], [0, 4], target, cache),
                               want, rtol=1e-4, atol=1e-4)
    for layer in range(TINY["layers"]):  # the stale entries stored nothing: positions 4 and 5 are as cached
        for got, was in zip((cache[0][layer], cache[1][layer]), (caches[0][layer], caches[1][layer])):
            assert torch.equal(got[5, 4:6], was[5, 4:6])

"""Megakernel tests: the task graph and its CPU executor on any machine, the persistent kernel in
Triton's interpreter with one worker (programs run one after another there, so several workers would
spin forever), and with every SM on a GPU (``-m gpu``)."""

import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before vllm_mirage.ops is imported: see tests/ops/conftest.py

from tests.ops.test_qk_norm_rope import _cos_sin_cache  # noqa: E402
from vllm_mirage.megakernel.state import DecodeBatch, DecodeWeights  # noqa: E402


def random_weights(*, hidden, inter, hq, hkv, d, layers, vocab, dtype, device="cpu", seed=0,
                   max_positions=256) -> DecodeWeights:
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: 8B shapes are slow on a CPU
    rnd = lambda *s, scale: (scale * torch.randn(*s, generator=gen, device=device)).to(dtype)  # noqa: E731
    norm = lambda n: (1 + 0.3 * torch.randn(n, generator=gen, device=device)).to(dtype)  # noqa: E731
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
        cos_sin_cache=_cos_sin_cache(max_positions, d, base=10000.0).to(device),
        eps=1e-6,
    )


def float32_weights(weights: DecodeWeights) -> DecodeWeights:
    """The same weights cast to float32, for a reference run whose own rounding is negligible."""
    out = copy.copy(weights)
    for name in weights.PER_LAYER:
        setattr(out, name, [t.float() for t in getattr(weights, name)])
    out.final_norm, out.lm_head = weights.final_norm.float(), weights.lm_head.float()
    return out


def random_batch(positions, *, layers, hkv, d, dtype, block_size=16, num_blocks=32, layout="flash", device="cpu",
                 seed=1) -> DecodeBatch:
    """Caches hold random keys/values for every earlier position; blocks are handed out shuffled, as
    vLLM's allocator does after a while, so a wrong block-table lookup reads the wrong tokens.

    ``layout``: "flash" is FlashAttention's older ``[2, blocks, block_size, Hkv, D]``; "fa_packed" is vLLM
    0.26's (keys and values side by side in the last dim); "head_major" is
    ``[blocks, Hkv, block_size, 2 D]`` with keys then values in each (block, head): other strides for the
    same logical view, as another backend could have.
    """
    gen = torch.Generator().manual_seed(seed)
    per_request = max(p // block_size + 1 for p in positions)
    order = torch.randperm(num_blocks, generator=gen)[: len(positions) * per_request]
    tables = order.view(len(positions), per_request).to(torch.int32)
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen, device=device).to(dtype)  # noqa: E731
    k_caches, v_caches = [], []
    for _ in range(layers):
        if layout == "flash":
            kv = randn(2, num_blocks, block_size, hkv, d)
            k_caches.append(kv[0])
            v_caches.append(kv[1])
        elif layout == "fa_packed":
            # vLLM 0.26's FlashAttention cache: physical [blocks, block_size, Hkv, 2 D] (NHD), handed to the
            # model as the logical [blocks, Hkv, block_size, 2 D]; the bridge splits it like vLLM does.
            from vllm_mirage.megakernel.bridge import split_kv_cache

            physical = randn(num_blocks, block_size, hkv, 2 * d)
            k, v = split_kv_cache(physical.permute(0, 2, 1, 3), hkv, d)
            k_caches.append(k)
            v_caches.append(v)
        else:
            kv = randn(num_blocks, hkv, block_size, 2 * d)
            halves = kv.view(num_blocks, hkv, 2 * block_size, d).permute(0, 2, 1, 3)
            k_caches.append(halves[:, :block_size])
            v_caches.append(halves[:, block_size:])
    slots = [int(tables[b, p // block_size]) * block_size + p % block_size for b, p in enumerate(positions)]
    return DecodeBatch(
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        block_tables=tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        k_caches=k_caches,
        v_caches=v_caches,
    )


def clone_batch(batch: DecodeBatch, dtype=None) -> DecodeBatch:
    """The same batch over copies of its caches (optionally cast), for a reference run."""
    cast = (lambda t: t.clone()) if dtype is None else (lambda t: t.to(dtype, copy=True))  # noqa: E731
    return DecodeBatch(batch.positions, batch.block_tables, batch.slot_mapping,
                       [cast(k) for k in batch.k_caches], [cast(v) for v in batch.v_caches], batch.first_rows)


# A tiny rank: GQA group 2, sizes that do not divide the tiles (I, V), a 16-token KV block.
TINY = dict(hidden=128, inter=200, hq=4, hkv=2, d=32, layers=2, vocab=300)


def decode_token(weights: DecodeWeights, caches, table, pos: int, token: int, lm_head: bool = True) -> torch.Tensor:
    """The layerwise reference's one-token step of a request with block ``table`` [1, *]: ``token`` (its
    embedding row of the lm_head, any [V, H] table serving) at ``pos``, over and into ``caches`` (key and
    value lists ``[blocks, block_size, Hkv, D]``); its logits, or without ``lm_head`` its final-normed hidden."""
    from vllm_mirage.megakernel import reference

    block = caches[0][0].shape[1]
    slot = int(table[0, pos // block]) * block + pos % block
    batch = DecodeBatch(torch.tensor([pos]), table, torch.tensor([slot]), *caches)
    embedded = torch.nn.functional.embedding(torch.tensor([int(token)]), weights.lm_head)
    return reference.decode_step(weights, batch, embedded, lm_head=lm_head)[0]


def request_rows_batch(requests, *, layers, hkv, d, dtype, num_blocks=32, layout="flash", device="cpu",
                       seed=1) -> DecodeBatch:
    """Rows of several new tokens a request, as a verify pass has them: ``requests`` lists (tokens cached,
    new tokens) per request; each request's rows are adjacent, at consecutive positions, over the request's
    blocks (:func:`random_batch`'s caches), with ``first_rows`` saying where each request starts."""
    last = [cached + new - 1 for cached, new in requests]
    per_request = random_batch(last, layers=layers, hkv=hkv, d=d, dtype=dtype, num_blocks=num_blocks, layout=layout,
                               device=device, seed=seed)
    positions, request, first = [], [], []
    for r, (cached, new) in enumerate(requests):
        first += [len(positions)] * new
        positions += range(cached, cached + new)
        request += [r] * new
    tables = per_request.block_tables[torch.tensor(request, device=device)]
    block = per_request.block_size
    slots = [int(tables[i, p // block]) * block + p % block for i, p in enumerate(positions)]
    return DecodeBatch(torch.tensor(positions, dtype=torch.int64, device=device), tables,
                       torch.tensor(slots, dtype=torch.int64, device=device), per_request.k_caches,
                       per_request.v_caches, torch.tensor(first, dtype=torch.int32, device=device))


def attention_last_row_first(graph):
    """``graph`` (one worker) with each layer's ATTN tasks in reverse: the last row's run first, so a row
    that read its request's earlier rows from the cache would find what those slots held before."""
    from vllm_mirage.megakernel.graph import SIGNAL_STAGE, TYPE, Task, TaskGraph

    stages = graph.tasks[:, SIGNAL_STAGE].tolist()
    queue = sorted(graph.queue.tolist(), key=lambda t: (stages[t], -t if graph.tasks[t, TYPE] == Task.ATTN else t))
    return TaskGraph(graph.shape, graph.tasks, torch.tensor(queue, dtype=torch.int32), graph.queue_offsets,
                     graph.stage_counts)


def row_by_row(weights: DecodeWeights, batch: DecodeBatch, hidden: torch.Tensor, lm_head: bool = True) -> torch.Tensor:
    """The layerwise reference's one-token steps of ``batch``'s rows, one after another, appending to its
    caches: what a step of several rows a request must equal."""
    from vllm_mirage.megakernel import reference

    out = []
    for i in range(hidden.shape[0]):
        row = DecodeBatch(batch.positions[i : i + 1], batch.block_tables[i : i + 1], batch.slot_mapping[i : i + 1],
                          batch.k_caches, batch.v_caches)
        out.append(reference.decode_step(weights, row, hidden[i : i + 1], lm_head)[0])
    return torch.stack(out)


def vllm_model(weights: DecodeWeights):
    """The attributes of a vLLM Qwen3 model that the bridge reads, over ``weights``."""
    from types import SimpleNamespace as ns

    d = weights.q_norm[0].shape[0]
    layers = [
        ns(input_layernorm=ns(weight=weights.input_norm[i], variance_epsilon=weights.eps),
           post_attention_layernorm=ns(weight=weights.post_norm[i]),
           self_attn=ns(qkv_proj=ns(weight=weights.qkv[i]), q_norm=ns(weight=weights.q_norm[i]),
                        k_norm=ns(weight=weights.k_norm[i]), o_proj=ns(weight=weights.o[i]),
                        rotary_emb=ns(cos_sin_cache=weights.cos_sin_cache),
                        attn=ns(num_kv_heads=weights.shape(batch=1).num_kv_heads, head_size=d,
                                layer_name=f"draft.{i}.attn")),
           mlp=ns(gate_up_proj=ns(weight=weights.gate_up[i]), down_proj=ns(weight=weights.down[i])))
        for i in range(weights.num_layers)
    ]
    return ns(model=ns(layers=layers, norm=ns(weight=weights.final_norm), embed_tokens=ns(weight=weights.lm_head)),
              lm_head=ns(weight=weights.lm_head))

"""Two PyTorch references for the megakernel.

* :func:`decode_step` computes a Qwen3 decode step layer by layer, the way vLLM's model does, with the
  fused ops' references: what the megakernel must equal.
* :func:`run_graph` executes a :class:`~vllm_mirage.megakernel.graph.TaskGraph` tile by tile with the
  same math, simulating its workers and counters: it proves on any machine that the graph computes the
  step, that every task's inputs are complete when it runs and that the workers cannot deadlock
  (Triton's interpreter runs programs one after another, so spin-waits cannot be tested there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_mirage.megakernel.graph import (
    INDEX,
    LAYER,
    NO_WAIT,
    SIGNAL_STAGE,
    TYPE,
    WAIT_COUNT,
    WAIT_STAGE,
    Task,
    TaskGraph,
)
from vllm_mirage.megakernel.state import DOWN_FRACTION_BITS, DecodeBatch, DecodeBuffers, DecodeWeights
from vllm_mirage.ops import reference as ops


def cached_tokens(cache, block_table, start: int, end: int) -> torch.Tensor:
    """Tokens [start, end) of one request from a paged cache ``[num_blocks, block_size, Hkv, D]``."""
    block_size = cache.shape[1]
    blocks = block_table[: (end + block_size - 1) // block_size].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[start:end]


def store_token(k_cache, v_cache, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write a token's key and value at cache ``slot`` (block × block_size + offset); < 0: a padding
    row, nothing to store."""
    if slot >= 0:
        block, offset = divmod(slot, k_cache.shape[1])
        k_cache[block, offset] = k
        v_cache[block, offset] = v


def decode_attention(q, k_new, v_new, k_cache, v_cache, block_table, position: int, slot: int) -> torch.Tensor:
    """One request's decode attention for one layer; stores ``k_new``/``v_new`` at cache ``slot``.

    ``q`` [Hq, D] and ``k_new``/``v_new`` [Hkv, D] are after q/k norm and rotary; the caches
    ``[num_blocks, block_size, Hkv, D]`` hold the ``position`` earlier tokens. Softmax in float32,
    output rounded to the activation dtype.
    """
    store_token(k_cache, v_cache, slot, k_new, v_new)
    keys = torch.cat([cached_tokens(k_cache, block_table, 0, position), k_new[None]]).float()
    values = torch.cat([cached_tokens(v_cache, block_table, 0, position), v_new[None]]).float()
    group = q.shape[0] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,nhd->hn", q.float(), keys) * q.shape[-1] ** -0.5
    return torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), values).to(q.dtype)


def attention_part(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """Softmax attention of ``q`` [G, D] over ``keys``/``values`` [N, D] (N may be 0), left unnormalised
    in float32 as a context split leaves it: (running max [G], sum of exponentials [G], acc [G, D])."""
    if keys.shape[0] == 0:
        zeros = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        return zeros[:, 0] - float("inf"), zeros[:, 0], zeros
    scores = q.float() @ keys.float().T * q.shape[-1] ** -0.5
    m = scores.amax(-1)
    p = (scores - m[:, None]).exp()
    return m, p.sum(-1), p @ values.float()


def merge_parts(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """The attention output [G, D] from S parts (``m``, ``l`` [G, S], ``acc`` [G, S, D])."""
    w = (m - m.amax(-1, keepdim=True)).exp()
    return (w[..., None] * acc).sum(1) / (w * l).sum(1)[:, None]


def decode_step(weights: DecodeWeights, batch: DecodeBatch, hidden: torch.Tensor, lm_head: bool = True) -> torch.Tensor:
    """Logits [B, V] for embedded tokens ``hidden`` [B, H] (or, without ``lm_head``, the final-normed
    hidden states [B, H]); appends this step's keys and values."""
    eps, d = weights.eps, weights.q_norm[0].shape[0]
    residual = torch.zeros_like(hidden)
    x = hidden
    for layer in range(weights.num_layers):
        qkv, residual = ops.rms_norm_linear(x, weights.input_norm[layer], weights.qkv[layer], eps, residual)
        hq = weights.o[layer].shape[1]
        hkv = (qkv.shape[1] - hq) // 2
        q, k, v = qkv.split([hq, hkv, hkv], dim=-1)
        q, k = ops.qk_norm_rope(q, k, weights.q_norm[layer], weights.k_norm[layer], batch.positions,
                                weights.cos_sin_cache, eps)
        attn = torch.stack([
            decode_attention(q[b].view(-1, d), k[b].view(-1, d), v[b].view(-1, d), batch.k_caches[layer],
                             batch.v_caches[layer], batch.block_tables[b], int(batch.positions[b]),
                             int(batch.slot_mapping[b])).reshape(-1)
            for b in range(hidden.shape[0])
        ])
        o = F.linear(attn, weights.o[layer])
        act, residual = ops.rms_norm_linear_silu_mul(o, weights.post_norm[layer], weights.gate_up[layer], eps, residual)
        x = F.linear(act, weights.down[layer])
    if not lm_head:
        return ops.add_rms_norm(x, residual, weights.final_norm, eps)[0]
    return ops.rms_norm_linear(x, weights.final_norm, weights.lm_head, eps, residual)[0]


def run_graph(graph: TaskGraph, weights: DecodeWeights, batch: DecodeBatch, buffers: DecodeBuffers,
              attention=None) -> torch.Tensor:
    """Execute ``graph`` task by task, as its workers would; return the logits (or final hidden) buffer.

    ``attention(layer, q, k, v) -> out`` (all requests, q/k already normalised and rotated) replaces
    the ATTN tasks' own attention and KV-cache append: the first ATTN task of a layer runs it for the
    whole layer, the others of that stage have nothing left to do. The vLLM bridge passes vLLM's
    attention layer where it cannot read the backend's cache itself.

    Workers take turns; one whose next task is still waiting on a counter is skipped. If every worker
    is waiting, the graph would deadlock on the GPU: that raises. Running a task whose wait is met but
    whose inputs are incomplete would compute garbage; the tests compare the result with
    :func:`decode_step`.
    """
    buffers.sync.zero_()  # the head arrivals of split attention count from zero, as in the kernel
    counters = [0] * graph.shape.num_stages
    queues = [graph.worker_queue(w) for w in range(graph.num_workers)]
    heads = [0] * graph.num_workers
    tasks = graph.tasks.tolist()
    remaining = len(tasks)
    while remaining:
        progressed = False
        for w, queue in enumerate(queues):
            if heads[w] == len(queue):
                continue
            row = tasks[queue[heads[w]]]
            if row[WAIT_STAGE] != NO_WAIT and counters[row[WAIT_STAGE]] < row[WAIT_COUNT]:
                continue
            run_task(row, graph, weights, batch, buffers, attention)
            counters[row[SIGNAL_STAGE]] += 1
            heads[w] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            waiting = [tasks[q[h]] for q, h in zip(queues, heads) if h < len(q)]
            raise RuntimeError(f"task graph deadlocks: every worker waits, next tasks {waiting}")
    buffers.counters.copy_(torch.tensor(counters, dtype=torch.int32))
    return buffers.logits if graph.shape.lm_head else buffers.hidden_out


def run_task(row, graph: TaskGraph, weights: DecodeWeights, batch: DecodeBatch, buf: DecodeBuffers,
             attention=None) -> None:
    """One tile of the step, reading and writing the same buffer slots as the kernel."""
    shape, eps = graph.shape, weights.eps
    task, layer, index = Task(row[TYPE]), row[LAYER], row[INDEX]
    cols = lambda block, n, tile=index: slice(tile * block, min((tile + 1) * block, n))  # noqa: E731
    if task == Task.QKV:
        n = cols(shape.qkv_rows, shape.qkv_features)
        buf.qkv[layer][:, n] = F.linear(_normed(buf, 2 * layer, weights.input_norm[layer], eps), weights.qkv[layer][n])
    elif task == Task.ATTN and attention is not None:
        if index == 0:
            hq, hkv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
            q, k, v = buf.qkv[layer].split([hq, hkv, hkv], dim=-1)
            q, k = ops.qk_norm_rope(q, k, weights.q_norm[layer], weights.k_norm[layer], batch.positions,
                                    weights.cos_sin_cache, eps)
            buf.attn[layer] = attention(layer, q, k, v.contiguous())
    elif task == Task.ATTN:
        _attention_task(shape, layer, index, weights, batch, buf)
    elif task == Task.O:
        n = cols(shape.block_n_out, shape.hidden)
        _add_to_residual(buf, 2 * layer + 1, index, n, F.linear(buf.attn[layer], weights.o[layer][n]))
    elif task == Task.GU:
        gate_up = weights.gate_up[layer]
        x = _normed(buf, 2 * layer + 1, weights.post_norm[layer], eps)
        for tile in shape.gu_tiles(index):
            n = cols(shape.block_n, shape.intermediate, tile)
            buf.act[layer][:, n] = ops.linear_silu_mul(x, torch.cat([gate_up[n], gate_up[shape.intermediate :][n]]))
            if shape.fused_down:
                part = F.linear(buf.act[layer][:, n].float(), weights.down[layer][:, n].float())
                buf.down_acc += (part * 2.0**DOWN_FRACTION_BITS).to(torch.int64)  # truncated, as in the kernel
    elif task == Task.DOWN and shape.fused_down:
        n = cols(shape.block_n_out, shape.hidden)
        y = (buf.down_acc[:, n].to(torch.float32) * 2.0**-DOWN_FRACTION_BITS).to(buf.res.dtype)
        buf.down_acc[:, n] = 0
        _add_to_residual(buf, 2 * layer + 2, index, n, y)
    elif task == Task.DOWN:
        n = cols(shape.block_n_out, shape.hidden)
        _add_to_residual(buf, 2 * layer + 2, index, n, F.linear(buf.act[layer], weights.down[layer][n]))
    elif task == Task.NORM:  # after the last layer, one request
        buf.hidden_out[index] = _normed(buf, 2 * shape.num_layers, weights.final_norm, eps)[index]
    else:  # Task.LM, after the last layer
        n = cols(shape.block_n_lm, shape.vocab)
        buf.logits[:, n] = F.linear(_normed(buf, 2 * shape.num_layers, weights.final_norm, eps), weights.lm_head[n])


def _normed(buf: DecodeBuffers, slot: int, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of residual ``slot``, its RMS from the column tiles' sums of squares added in tile order."""
    x = buf.res[slot]
    rstd = torch.rsqrt(buf.sumsq[slot].sum(0) / x.shape[-1] + eps)
    return (x.float() * rstd[:, None]).to(x.dtype) * weight


def _add_to_residual(buf: DecodeBuffers, slot: int, tile: int, n: slice, y: torch.Tensor) -> None:
    """A projection's output columns ``n`` added to the residual before ``slot``; their sum of squares."""
    r = y + buf.res[slot - 1][:, n]
    buf.res[slot][:, n] = r
    buf.sumsq[slot, tile] = r.float().square().sum(-1)


def _attention_task(shape, layer: int, index: int, weights: DecodeWeights, batch: DecodeBatch,
                    buf: DecodeBuffers) -> None:
    """One (row, kv head, split): its part of the cached tokens; the last split also appends this step's
    k/v and attends to the request's earlier rows of the step (``DecodeBatch.first_rows``) and to its own.
    With one split the output goes straight to ``attn``; otherwise the part goes to ``attn_acc``/``attn_ml``
    and the head's last arrival merges all parts. Slices here are even; the kernel's are whole chunks
    (``attention_tile.ATTN_CHUNK`` tokens). The merge is exact either way: only rounding differs."""
    b, kvh, split = shape.attn_task(index)
    splits, d, group = shape.attn_splits, shape.head_dim, shape.num_heads // shape.num_kv_heads
    heads = slice(kvh * group * d, (kvh + 1) * group * d)
    qkv = buf.qkv[layer][b : b + 1]
    k_col = shape.num_heads * d + kvh * d
    v_col = (shape.num_heads + shape.num_kv_heads) * d + kvh * d
    q, k = ops.qk_norm_rope(qkv[:, heads], qkv[:, k_col : k_col + d], weights.q_norm[layer],
                            weights.k_norm[layer], batch.positions[b : b + 1], weights.cos_sin_cache, eps=weights.eps)
    q, k, v = q.view(group, d), k.view(d), qkv[0, v_col : v_col + d]
    k_cache, v_cache = batch.k_caches[layer][:, :, kvh], batch.v_caches[layer][:, :, kvh]
    position, slot, table = int(batch.positions[b]), int(batch.slot_mapping[b]), batch.block_tables[b]
    first = b if batch.first_rows is None else max(int(batch.first_rows[b]), b - position)  # kernel's bound
    cached = position - (b - first)  # the request's earlier rows of this step are not in the cache yet
    per = -(-cached // splits)
    start, end = min(split * per, cached), min((split + 1) * per, cached)
    keys, values = cached_tokens(k_cache, table, start, end), cached_tokens(v_cache, table, start, end)
    if split == splits - 1:
        store_token(k_cache, v_cache, slot, k, v)
        if first < b:
            rows = buf.qkv[layer][first:b]
            _, earlier = ops.qk_norm_rope(rows[:, heads], rows[:, k_col : k_col + d], weights.q_norm[layer],
                                          weights.k_norm[layer], batch.positions[first:b], weights.cos_sin_cache,
                                          eps=weights.eps)
            keys, values = torch.cat([keys, earlier.view(-1, d)]), torch.cat([values, rows[:, v_col : v_col + d]])
        keys, values = torch.cat([keys, k[None]]), torch.cat([values, v[None]])
    m, l, acc = attention_part(q, keys, values)
    if splits == 1:
        buf.attn[layer][b, heads] = (acc / l[:, None]).to(q.dtype).reshape(-1)
        return
    rows = slice(kvh * group, (kvh + 1) * group)
    buf.attn_acc[layer, b, rows, split] = acc
    buf.attn_ml[layer, b, rows, split] = torch.stack([m, l], -1)
    buf.arrivals[layer, b, kvh] += 1
    if buf.arrivals[layer, b, kvh] == splits:
        ml = buf.attn_ml[layer, b, rows]
        merged = merge_parts(ml[..., 0], ml[..., 1], buf.attn_acc[layer, b, rows])
        buf.attn[layer][b, heads] = merged.to(q.dtype).reshape(-1)

"""What a decode step reads (weights, the batch's KV cache) and the buffers it writes.

The weights are references to vLLM's own parameters, never copies, so that the loader, tensor
parallelism and quantization metadata stay vLLM's. Every intermediate activation has its own per-layer
slot: each slot is written once per step, so no task can overwrite what a slower worker still reads.
For a decode batch that is a few hundred KB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_mirage.megakernel.graph import DecodeShape

# Fixed point of ``DecodeBuffers.down_acc``: integer sums are exact, so the total does not depend on the
# order in which the GU tasks' atomics land (a float32 one would, and the step would not repeat bit for
# bit). 2^-32 resolution leaves ±2^31 of range, and each part keeps float32's 24 significant bits
# down to magnitudes of 2^-8.
DOWN_FRACTION_BITS = 32


@dataclass
class DecodeWeights:
    """Per-layer lists in layer order; shapes as vLLM stores them for one rank."""

    input_norm: list[torch.Tensor]  # [H]
    qkv: list[torch.Tensor]  # [(Hq + 2 Hkv) D, H]
    q_norm: list[torch.Tensor]  # [D]
    k_norm: list[torch.Tensor]  # [D]
    o: list[torch.Tensor]  # [H, Hq D]
    post_norm: list[torch.Tensor]  # [H]
    gate_up: list[torch.Tensor]  # [2 I, H]: gate rows, then up rows
    down: list[torch.Tensor]  # [H, I]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]
    cos_sin_cache: torch.Tensor  # [max_pos, D]: cos half, then sin half (vLLM's rotary cache)
    eps: float

    PER_LAYER = ("input_norm", "qkv", "q_norm", "k_norm", "o", "post_norm", "gate_up", "down")

    @property
    def num_layers(self) -> int:
        return len(self.qkv)

    def shape(self, batch: int, **blocks) -> DecodeShape:
        d = self.q_norm[0].shape[0]
        hq = self.o[0].shape[1] // d
        return DecodeShape(
            hidden=self.qkv[0].shape[1],
            intermediate=self.gate_up[0].shape[0] // 2,
            num_heads=hq,
            num_kv_heads=(self.qkv[0].shape[0] // d - hq) // 2,
            head_dim=d,
            num_layers=self.num_layers,
            vocab=self.lm_head.shape[0],
            batch=batch,
            **blocks,
        )


@dataclass
class DecodeBatch:
    """A batch of new tokens, one row each, as vLLM's paged attention sees it: a pure decode (one row per
    request), or rows of which several belong to one request (a verify pass), given by ``first_rows``.

    The caches are per-layer views ``[num_blocks, block_size, Hkv, D]`` of vLLM's own KV-cache tensors,
    with whatever strides the backend's layout gives them (FlashAttention's ``[2, blocks, block_size,
    Hkv, D]``): the step reads the tokens vLLM's prefill wrote and appends this step's where vLLM's slot
    mapping says. (vLLM's CPU backend packs each block's interior per ISA: not a strided view, so on
    CPU the bridge leaves attention and the cache to vLLM; see ``bridge``.)
    """

    positions: torch.Tensor  # int [B]: position of each row's token (its request's tokens before it)
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    slot_mapping: torch.Tensor  # int [B]: cache slot (block * block_size + offset) of the new token; < 0: padding
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    # int32 [B]: the row of each row's request's first new token. A request's rows are adjacent, at
    # consecutive positions; the cache holds its tokens before the first. None: one row per request.
    first_rows: torch.Tensor | None = None

    @property
    def block_size(self) -> int:
        return self.k_caches[0].shape[1]


class DecodeBuffers:
    """Activations of one step, allocated once per batch size (CUDA graphs need fixed addresses).

    The residual stream has a slot per norm point: ``res[2 l]`` enters layer ``l``'s input norm,
    ``res[2 l + 1]`` its post-attention norm, ``res[2 L]`` the final norm. ``sumsq[j, tile, b]`` is the
    sum of squares of ``res[j][b]`` over one ``block_n_out`` column tile, written by the task that wrote
    those columns; a norm adds the tiles in order.

    With ``attn_splits`` > 1 each ATTN task leaves its part of a head's attention unnormalised in
    float32 (``attn_acc``; ``attn_ml`` holds its running max and sum) and bumps the head's ``arrivals``
    counter; the task that arrives last merges the parts into ``attn``.

    With ``fused_down`` the GU tasks add their parts of W_down's product into ``down_acc`` (int64
    [B, H], fixed point with ``DOWN_FRACTION_BITS`` fractional bits); each DOWN task takes its columns'
    sum and zeroes them for the next layer. ``sync`` holds the stage counters, the arrivals and
    ``down_acc``, zeroed together before each step.
    """

    def __init__(self, shape: DecodeShape, dtype: torch.dtype, device):
        L, B, H = shape.num_layers, shape.batch, shape.hidden
        new = lambda *s: torch.empty(s, dtype=dtype, device=device)  # noqa: E731
        self.res = new(2 * L + 1, B, H)
        self.sumsq = torch.empty(2 * L + 1, shape.out_tiles, B, dtype=torch.float32, device=device)
        self.qkv = new(L, B, shape.qkv_features)
        self.attn = new(L, B, shape.num_heads * shape.head_dim)
        self.act = new(L, B, shape.intermediate)
        self.rows = torch.arange(B, dtype=torch.int32, device=device)  # first_rows of a pure decode
        self.logits = new(B, shape.vocab) if shape.lm_head else None
        self.hidden_out = None if shape.lm_head else new(B, H)  # final norm output (NORM tasks)
        heads, splits = B * shape.num_kv_heads, shape.attn_splits
        counts = shape.num_stages + L * heads
        counts += counts % 2  # down_acc's int64s start 8-byte aligned
        self.sync = torch.zeros(counts + (2 * B * H if shape.fused_down else 0), dtype=torch.int32, device=device)
        self.counters = self.sync[: shape.num_stages]
        self.arrivals = self.sync[shape.num_stages : shape.num_stages + L * heads].view(L, B, shape.num_kv_heads)
        self.down_acc = self.sync[counts:].view(torch.int64).view(B, H) if shape.fused_down else None
        parts = (L, B, shape.num_heads, splits) if splits > 1 else (1, 1, 1, 1)  # unread at one split
        self.attn_acc = torch.empty(*parts, shape.head_dim, dtype=torch.float32, device=device)
        self.attn_ml = torch.empty(*parts, 2, dtype=torch.float32, device=device)

    def load_input(self, hidden: torch.Tensor) -> None:
        """``hidden`` [B, H]: the embedded tokens (vLLM's embedding layer runs before the step). They are
        layer 0's residual; their sum of squares goes into the first tile's slot."""
        self.res[0].copy_(hidden)
        self.sumsq[0].zero_()
        self.sumsq[0, 0] = hidden.float().square().sum(-1)

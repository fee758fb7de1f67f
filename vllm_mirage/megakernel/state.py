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

    # Column order of the per-layer pointer table the kernel reads.
    TABLE = ("input_norm", "qkv", "q_norm", "k_norm", "o", "post_norm", "gate_up", "down")

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

    def pointer_table(self) -> torch.Tensor:
        """int64 [L, 8] of data pointers, columns in :attr:`TABLE` order."""
        for name in self.TABLE:
            for t in getattr(self, name):
                if not t.is_contiguous():
                    raise ValueError(f"megakernel: {name} weights must be contiguous")
        rows = [[getattr(self, name)[layer].data_ptr() for name in self.TABLE] for layer in range(self.num_layers)]
        return torch.tensor(rows, dtype=torch.int64, device=self.qkv[0].device)


@dataclass
class DecodeBatch:
    """A pure-decode batch as vLLM's paged attention sees it.

    The caches are per-layer views ``[num_blocks, block_size, Hkv, D]`` of vLLM's own KV-cache tensors,
    with whatever strides the backend's layout gives them (FlashAttention's ``[2, blocks, block_size,
    Hkv, D]``): the step reads the tokens vLLM's prefill wrote and appends this step's where vLLM's slot
    mapping says. (vLLM's CPU backend packs each block's interior per ISA: not a strided view, so on
    CPU the bridge leaves attention and the cache to vLLM; see ``bridge``.)
    """

    positions: torch.Tensor  # int [B]: position of each request's new token (= tokens already cached)
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    slot_mapping: torch.Tensor  # int [B]: cache slot (block * block_size + offset) of the new token; < 0: padding
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]

    @property
    def block_size(self) -> int:
        return self.k_caches[0].shape[1]


class DecodeBuffers:
    """Activations of one step, allocated once per batch size (CUDA graphs need fixed addresses)."""

    def __init__(self, shape: DecodeShape, dtype: torch.dtype, device):
        L, B, H = shape.num_layers, shape.batch, shape.hidden
        new = lambda *s: torch.empty(s, dtype=dtype, device=device)  # noqa: E731
        # Partial sums (float32, one slot per K range) of the split-K projections: the consumer adds
        # the slots and rounds. x[0, 0]: the embedded tokens (other slots 0); x[l + 1]: layer l's down_proj.
        self.x = torch.zeros(L + 1, max(1, shape.split_down), B, H, dtype=torch.float32, device=device)
        self.o = torch.empty(L, shape.split_o, B, H, dtype=torch.float32, device=device)
        self.res_mlp = new(L + 1, B, H)  # res_mlp[0] = 0; res_mlp[l + 1]: residual after layer l's attention
        self.res_attn = new(L, B, H)  # residual entering layer l's attention: x[l] + res_mlp[l]
        self.qkv = new(L, B, shape.qkv_features)
        self.attn = new(L, B, shape.num_heads * shape.head_dim)
        self.act = new(L, B, shape.intermediate)
        self.logits = new(B, shape.vocab) if shape.lm_head else None
        self.hidden_out = None if shape.lm_head else new(B, H)  # final norm output (NORM tasks)
        self.counters = torch.zeros(shape.num_stages, dtype=torch.int32, device=device)
        self.res_mlp[0].zero_()

    def load_input(self, hidden: torch.Tensor) -> None:
        """``hidden`` [B, H]: the embedded tokens (vLLM's embedding layer runs before the step)."""
        self.x[0, 0].copy_(hidden)

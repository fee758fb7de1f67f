"""The megakernel inside vLLM: decode steps of a Mirage Qwen3 model run as one task graph.

``MegakernelDecoder`` reads what vLLM's forward context holds for the step (attention metadata: block
table, query lengths; the slot mapping; each layer's KV-cache tensor) and, when every request adds at most
``max_query`` tokens (a decode; or a self-draft's verify pass of a few tokens a request), runs the step's
layers and final norm through the graph, one row per token; vLLM's lm_head and logits processor stay in
charge. On a GPU the persistent kernel runs it (FlashAttention's cache layout); on CPU the graph's
executor does, with vLLM's attention layer in the ATTN stage, because the CPU backend's cache is a strided
view only for some of its attention kernels (self-draft rows, which cannot use vLLM's attention, read
those: ``split_cpu_kv_cache``). Prefill, mixed batches, profiling runs and anything it does not recognise
return ``None``: the caller takes the fused-layer path (a pure decode) or stock's, which share the same KV
cache. So do steps the kernel cannot run (``kernel.shape_unsupported_reason``, e.g. a KV-cache block size
it does not handle): the bridge asks before building a graph, on CPU too, and logs the reason once.

The graph ends with the final norm, so the model's output is what ``Qwen3Model`` returns.
"""

from __future__ import annotations

import logging

import torch

from vllm_mirage.megakernel import kernel, prologue, reference
from vllm_mirage.megakernel.draft_rows import DraftRows
from vllm_mirage.megakernel.graph import build_task_graph
from vllm_mirage.megakernel.state import DecodeBatch, DecodeBuffers, DecodeWeights
from vllm_mirage.models.step import step_attention_metadata
from vllm_mirage.ops._dispatch import use_triton

# Under vLLM's logger tree (see plugin.py), without importing vLLM: the GPU kernel tests import this module.
logger = logging.getLogger(f"vllm.{__name__}")

# Larger decode batches take the fused layers: past one 16-token block the kernel's tiles run slower
# than stock vLLM (H100; on the H200 0.6B alone takes 1.44 / 2.38 ms at 32 / 64 against stock's whole
# step's 1.59 / 1.97, docs/design.md), and its buffers (kept per batch size) grow with the batch.
MAX_BATCH = 16
# A self-draft step's rows (draft_step), one per request: the kernel runs any batch (token blocks of up to
# 64), and a draft has no stock path to lose to.
MAX_DRAFT_ROWS = 64
# New tokens a request may add in a step the graph runs (a verify pass: the k drafts and one more): each
# row's attention task walks the request's earlier rows of the step one at a time.
MAX_QUERY_ROWS = 8


def draft_row_counts() -> list[int]:
    """The row counts a draft step runs at: powers of two, and ``MAX_DRAFT_ROWS``. Each row count is a
    graph of its own and may be a compile of its own (Triton specialises on 1 and on multiples of 16, the
    kernel's token block grows with the batch); vLLM's warm-up does not reach every count its steps take
    later (13 of 16 requests left), and a compile while serving stalls every request for seconds."""
    counts = [1]
    while counts[-1] < MAX_DRAFT_ROWS:
        counts.append(min(2 * counts[-1], MAX_DRAFT_ROWS))
    return counts


def draft_rows_for(n: int) -> int:
    """The row count a draft step of ``n`` requests runs at."""
    return next(c for c in draft_row_counts() if c >= n)


def decode_weights(model) -> DecodeWeights:
    """References to a (Mirage) Qwen3 model's parameters, in the megakernel's terms."""
    layers = list(model.model.layers)
    attn = [layer.self_attn for layer in layers]
    return DecodeWeights(
        input_norm=[layer.input_layernorm.weight for layer in layers],
        qkv=[a.qkv_proj.weight for a in attn],
        q_norm=[a.q_norm.weight for a in attn],
        k_norm=[a.k_norm.weight for a in attn],
        o=[a.o_proj.weight for a in attn],
        post_norm=[layer.post_attention_layernorm.weight for layer in layers],
        gate_up=[layer.mlp.gate_up_proj.weight for layer in layers],
        down=[layer.mlp.down_proj.weight for layer in layers],
        final_norm=model.model.norm.weight,
        lm_head=model.lm_head.weight,
        cos_sin_cache=attn[0].rotary_emb.cos_sin_cache,
        eps=layers[0].input_layernorm.variance_epsilon,
    )


def split_kv_cache(kv: torch.Tensor, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Key and value views ``[blocks, block_size, Hkv, D]`` of one layer's vLLM KV cache on a GPU, or None
    for a layout the kernel does not know. (vLLM's CPU backend: :func:`split_cpu_kv_cache`.)"""
    if kv.dim() == 4 and kv.shape[1] == num_kv_heads and kv.shape[3] == 2 * head_dim:
        # FlashAttention in vLLM 0.26: logical [blocks, Hkv, block_size, 2 D], each token's key then value
        # in the last dim (physically NHD or HND; the strides say which). vLLM splits it the same way.
        return tuple(kv.transpose(1, 2).split(head_dim, dim=-1))
    if kv.dim() == 5 and kv.shape[0] == 2 and kv.shape[3:] == (num_kv_heads, head_dim):
        return kv[0], kv[1]  # older FlashAttention layout: [2, blocks, block_size, Hkv, D]
    return None


# The CPU backend's cache layouts that are strided views: its "vec" and "vec16" attention kernels keep, per
# block and KV head, the keys transposed ([D, block_size]) and then the values ([block_size, D]). Its AMX,
# NEON and other kernels pack block interiors in tiles.
CPU_STRIDED_ISAS = ("vec", "vec16")


def split_cpu_kv_cache(kv: torch.Tensor, num_kv_heads: int, head_dim: int,
                       isa: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Key and value views ``[blocks, block_size, Hkv, D]`` of one layer's cache in vLLM's CPU backend
    (``[blocks, Hkv, block_size, 2 D]``, written by attention kernels of ``isa``), or None where that
    kernel's layout is not a strided view."""
    if isa not in CPU_STRIDED_ISAS or kv.dim() != 4 or not kv.is_contiguous():
        return None
    blocks, heads, block_size, width = kv.shape
    if heads != num_kv_heads or width != 2 * head_dim:
        return None
    per_head = kv.view(blocks, heads, 2 * block_size * head_dim)
    keys = per_head[..., : block_size * head_dim].unflatten(-1, (head_dim, block_size)).permute(0, 3, 1, 2)
    values = per_head[..., block_size * head_dim :].unflatten(-1, (block_size, head_dim)).permute(0, 2, 1, 3)
    return keys, values


class MegakernelDecoder:
    def __init__(self, model, max_batch: int = MAX_BATCH, max_query: int = 1, launch: dict | None = None):
        self.model = model
        self.max_batch = min(max_batch, MAX_BATCH)  # the plan's limit for this GPU, within the kernel's
        self.config = kernel.LaunchConfig(**(launch or {}))  # the plan's launch settings for this GPU
        self.max_query = min(max_query, MAX_QUERY_ROWS)  # new tokens a request: > 1 for verify passes
        self.weights = decode_weights(model)
        self.attn_layers = [layer.self_attn.attn for layer in model.model.layers]
        self.num_kv_heads = self.attn_layers[0].num_kv_heads
        self.head_dim = self.attn_layers[0].head_size
        # Batch size -> (graph, buffers, encoded program). The program and the KV-cache pointer table are
        # built once: neither vLLM's weights nor its KV-cache tensors move after start-up, and building
        # them is a host-to-device copy that must not happen inside a CUDA-graph capture.
        self._graphs: dict[int, tuple] = {}
        self._kvtab: torch.Tensor | None = None
        self._down_ptrs: torch.Tensor | None = None  # only fused_down graphs read it
        self._kv_views: tuple[list, list] | None = None  # per-layer key/value views, for the same reason
        self._declined: set[str] = set()
        self._refused: dict[int, str] = {}  # batch size -> why the kernel cannot run it
        self._draft_rows: dict[int, DraftRows] = {}  # rows -> their tensors
        # Steps run through the graph, counted on the device so that CUDA-graph replays count too.
        self._steps = torch.zeros((), dtype=torch.int64, device=self.weights.qkv[0].device)

    def steps(self) -> int:
        return int(self._steps.item())

    def declined(self) -> list[str]:
        """Why decode steps went to the plan's next path (fused layers or stock's): each reason once."""
        return sorted(self._declined)

    def _decline(self, why: str) -> None:
        if why not in self._declined:  # once per reason: this runs every step
            self._declined.add(why)
            logger.info("vllm-mirage: megakernel not used for a step (the plan's next path takes it): %s", why)

    def decode_batch(self, positions: torch.Tensor) -> DecodeBatch | None:
        from vllm.forward_context import get_forward_context

        name = self.attn_layers[0].layer_name
        meta = step_attention_metadata(name)
        if meta is None:  # profiling and warm-up runs
            return None
        query = getattr(meta, "max_query_len", None)
        if query is None or not 1 <= query <= self.max_query:
            return None  # prefill or mixed batch: not the megakernel's
        ctx = get_forward_context()
        if getattr(meta, "num_actual_tokens", positions.shape[0]) != positions.shape[0]:
            self._decline("padded batch (CUDA-graph sizes are not supported yet)")
            return None
        n = positions.shape[0]
        if n > self.max_batch:  # before anything runs on the device: a CUDA graph would keep it
            self._decline(f"decode batch of {n} > {self.max_batch}" if query == 1 else
                          f"verify pass of {n} tokens > {self.max_batch}")
            return None
        slots = getattr(ctx, "slot_mapping", None)
        slots = slots[0] if isinstance(slots, list) else slots
        slot_mapping = slots.get(name) if isinstance(slots, dict) and slots else getattr(meta, "slot_mapping", None)
        block_table = getattr(meta, "block_table", None)
        if slot_mapping is None or block_table is None:
            self._decline(f"attention metadata {type(meta).__name__} has no slot mapping or block table")
            return None
        if positions.is_cuda and self._kv_views is None:
            if torch.cuda.is_current_stream_capturing():
                self._decline("KV caches first seen inside a CUDA-graph capture")
                return None
            self._kv_views = self._split_kv_caches(ctx)
            if self._kv_views is None:
                return None
        # On CPU vLLM's attention layer reads and appends the cache (see __call__): no views needed.
        k_caches, v_caches = self._kv_views if positions.is_cuda else ([], [])
        if query == 1:
            return DecodeBatch(positions, block_table[:n], slot_mapping[:n], k_caches, v_caches)
        qsl = getattr(meta, "query_start_loc", None)
        if qsl is None:
            self._decline(f"attention metadata {type(meta).__name__} has no query start locations")
            return None
        request, first_rows = request_rows(qsl, n)
        return DecodeBatch(positions, block_table[request], slot_mapping[:n], k_caches, v_caches, first_rows)

    def _split_kv_caches(self, ctx) -> tuple[list, list] | None:
        k_caches, v_caches = [], []
        for attn in self.attn_layers:
            kv = _layer_kv_cache(attn, ctx)
            if kv.is_cuda:
                views = split_kv_cache(kv, self.num_kv_heads, self.head_dim)
            else:
                views = split_cpu_kv_cache(kv, self.num_kv_heads, self.head_dim, _layer_isa(attn, ctx))
            if views is None or kv.dtype != self.weights.qkv[0].dtype:
                self._decline(f"KV cache of shape {tuple(kv.shape)} / {kv.dtype} is not a layout it reads")
                return None
            k_caches.append(views[0])
            v_caches.append(views[1])
        return k_caches, v_caches

    def _build(self, n: int, batch: DecodeBatch, device: torch.device) -> None:
        """The graph, buffers and (GPU) encoded program for batches of ``n``, or the reason the kernel
        cannot run them. The shape's reason is asked on every platform, so that what the GPU declines is
        declined on CPU too; on a GPU the step's tensors are checked as well."""
        # One worker per SM on a GPU; the CPU executor simulates a few to exercise the counters.
        workers = torch.cuda.get_device_properties(0).multi_processor_count if device.type == "cuda" else 4
        shape = self.weights.shape(batch=n, lm_head=False).for_workers(workers)
        dtype = self.weights.qkv[0].dtype
        reason = kernel.shape_unsupported_reason(shape, self._cache_block_size(), dtype)
        if reason is not None:
            self._refused[n] = reason
            return
        graph = build_task_graph(shape, workers).to(device)
        buffers = DecodeBuffers(shape, dtype, device)
        program = None
        if device.type == "cuda":
            reason = kernel.unsupported_reason(graph, self.weights, batch, buffers)
            if reason is not None:
                self._refused[n] = reason
                return
            try:
                program = kernel.encode_program(graph, self.weights)
            except ValueError as e:  # weights that are not contiguous or not 16-byte aligned
                self._refused[n] = str(e).removeprefix("megakernel: ")
                return
        self._graphs[n] = (graph, buffers, program)

    def _cache_block_size(self) -> int:
        """Tokens per KV-cache block, read from the cache tensor the step attends over: dimension 2 in each
        layout vLLM uses here (FlashAttention's ``[blocks, Hkv, block_size, 2 D]`` and
        ``[2, blocks, block_size, Hkv, D]``, the CPU backend's ``[blocks, Hkv, block_size, 2 D]``)."""
        if self._kv_views is not None:  # [blocks, block_size, Hkv, D]
            return self._kv_views[0][0].shape[1]
        from vllm.forward_context import get_forward_context

        return _layer_kv_cache(self.attn_layers[0], get_forward_context()).shape[2]

    def _vllm_attention(self, layer: int, q, k, v) -> torch.Tensor:
        return self.attn_layers[layer](q, k, v)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """The final-normed hidden states [T, H] of a decode step (or a verify pass), or None (use the fused
        path for a pure decode, stock's otherwise)."""
        batch = self.decode_batch(positions)
        if batch is None:
            return None
        n = positions.shape[0]
        entry = self._graph_for(n, batch, positions.device)
        if entry is None:
            return None
        return self._run(entry, batch, input_ids).clone()  # the buffers are reused by the next step

    def draft_step(self, input_ids: torch.Tensor, positions: torch.Tensor,
                   target_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The final-normed hidden states [T, H] of a self-draft step whose layers share the target's KV
        cache: one row per request, its last real token run one position ahead of EAGLE's
        (``draft_rows``; ``target_ids``: the target's input ids of the step, which tell that token apart).
        Other rows are zero. None where it cannot run the step (no metadata, no cache views, no target ids,
        too many requests).

        The rows need the cache as strided views (:func:`split_kv_cache`, :func:`split_cpu_kv_cache`); on
        CPU the graph's executor runs them with its own attention over those views."""
        attn = self.attn_layers[0]
        # The catch-up step runs on the target's metadata, which may be keyed by the target's layers only.
        meta = step_attention_metadata(attn.layer_name) or step_attention_metadata(
            getattr(attn, "kv_sharing_target_layer_name", None) or attn.layer_name)
        qsl, table = getattr(meta, "query_start_loc", None), getattr(meta, "block_table", None)
        if meta is None:
            return None
        if qsl is None or table is None:
            self._decline(f"attention metadata {type(meta).__name__} has no query start locations or block table")
            return None
        tokens, requests = positions.shape[0], qsl.shape[0] - 1
        if target_ids is None or target_ids.shape[0] < tokens:
            self._decline("the target's input ids of the step were not recorded")
            return None
        if requests > MAX_DRAFT_ROWS:
            self._decline(f"draft step of {requests} requests > {MAX_DRAFT_ROWS}")
            return None
        n = draft_rows_for(requests)
        if n not in self._draft_rows:
            if positions.is_cuda and torch.cuda.is_current_stream_capturing():
                self._decline(f"draft step of {n} rows first seen inside a CUDA-graph capture")
                return None
            if self._kv_views is None:
                from vllm.forward_context import get_forward_context

                self._kv_views = self._split_kv_caches(get_forward_context())
                if self._kv_views is None:
                    return None
            if not self._draft_rows and positions.is_cuda:
                self.compile_draft_steps(table.shape[1], input_ids.dtype, positions.device)
            if n not in self._draft_rows:
                self._draft_rows[n] = DraftRows(n, table.shape[1], input_ids.dtype, positions.device)
        rows = self._draft_rows[n]
        fill = rows.fill if use_triton(positions) else rows.fill_reference
        fill(input_ids, target_ids, positions, qsl, table, self._cache_block_size(),
             self.weights.cos_sin_cache.shape[0])
        hidden = self._run_rows(rows, positions.device)
        if hidden is None:
            return None
        out = hidden.new_zeros(tokens + 1, hidden.shape[1])  # rows that store nothing land in the extra row
        return out.index_copy_(0, rows.rows, hidden)[:tokens]

    def compile_draft_steps(self, max_blocks: int, ids_dtype: torch.dtype, device) -> None:
        """Build and run the graph of every draft row count once, on rows that are all padding (they
        store nothing), so that no count compiles while serving; the rows are kept for the steps. Needs the
        cache views."""
        device = torch.device(device)
        for n in draft_row_counts():
            self._draft_rows[n] = DraftRows(n, max_blocks, ids_dtype, device)
            self._run_rows(self._draft_rows[n], device)

    def _run_rows(self, rows: DraftRows, device: torch.device) -> torch.Tensor | None:
        """The rows' final-normed hidden states through the graph of their count, or None where the kernel
        cannot run it."""
        batch = DecodeBatch(rows.positions, rows.block_tables, rows.slots, *self._kv_views)
        entry = self._graph_for(rows.ids.shape[0], batch, device)
        return None if entry is None else self._run(entry, batch, rows.ids, vllm_attention=False)

    def _graph_for(self, n: int, batch: DecodeBatch, device: torch.device) -> tuple | None:
        if n not in self._graphs and n not in self._refused:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # Building a graph copies tables to the device, which a CUDA-graph capture forbids. vLLM runs
                # each size eagerly before capturing it, so this only happens to a size it never warmed up.
                self._decline(f"batch size {n} first seen inside a CUDA-graph capture")
                return None
            self._build(n, batch, device)
        if n in self._refused:
            self._decline(self._refused[n])
            return None
        return self._graphs[n]

    def _run(self, entry: tuple, batch: DecodeBatch, input_ids: torch.Tensor,
             vllm_attention: bool = True) -> torch.Tensor:
        graph, buffers, program = entry
        embedding = self.model.model.embed_tokens.weight  # tensor-parallel size 1 (support.py): all rows
        if input_ids.is_cuda:
            if self._kvtab is None:
                self._kvtab = kernel.kv_pointer_table(batch)
                self._down_ptrs = kernel.down_pointer_table(self.weights)
            prologue.load_step_input(buffers, input_ids, embedding, self._steps)
            return kernel.decode_step(graph, self.weights, batch, buffers, program, self._kvtab, self.config,
                                      down_ptrs=self._down_ptrs, zero_sync=False)
        # vLLM's CPU cache packs block interiors per ISA, so the CPU executor runs the graph with
        # vLLM's own attention layer (cache append included) in the ATTN stage; everything else
        # (norms, GEMV tiles, counters, final norm) is the graph's.
        prologue.load_step_input_reference(buffers, input_ids, embedding, self._steps)
        attention = self._vllm_attention if vllm_attention else None
        return reference.run_graph(graph, self.weights, batch, buffers, attention=attention)


def request_rows(query_start_loc: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of a step's first ``n`` tokens, its request and the row of that request's first token,
    from vLLM's query start locations (on the device: no host sync, nothing a CUDA graph cannot replay)."""
    rows = torch.arange(n, dtype=query_start_loc.dtype, device=query_start_loc.device)
    request = torch.searchsorted(query_start_loc[1:], rows, right=True)
    request.clamp_(max=query_start_loc.shape[0] - 2)  # a CUDA graph's padding rows: into the last request
    return request, query_start_loc[request].to(torch.int32)


def _layer_isa(attn, ctx) -> str | None:
    """The CPU backend's attention kernel for a layer (it marks the layers of its cache groups; a layer
    that shares another's cache takes that one's)."""
    target = getattr(attn, "kv_sharing_target_layer_name", None)
    owner = ctx.no_compile_layers.get(target, attn) if target else attn
    return getattr(attn, "isa", None) or getattr(owner, "isa", None)


def _layer_kv_cache(attn, ctx) -> torch.Tensor:
    kv = attn.kv_cache
    if isinstance(kv, list):  # older vLLM: one tensor per virtual engine
        kv = kv[ctx.virtual_engine]
    return kv

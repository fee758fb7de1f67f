"""Decode GEMV with whole activation rows in registers: RMSNorm (+ residual) computed once per program,
then weight slabs of ``BLOCK_N`` full rows streamed past it.

The chunked kernel in ``_norm_gemv.py`` walks H in ``BLOCK_K`` steps, so every program must first make a
serial pass over x for the RMS before its first weight load: at H = 4096 that chain made norm + QKV
slower than norm kernel + cuBLAS (docs/design.md). Here a program loads its token rows whole, in
the same instant as its first weight slab, so there is no chain: the norm costs one L2 round trip that
overlaps the weight stream. Each program then loops over its share of the output slabs (a persistent
grid), so the norm is paid once per program, not once per tile, and the loop's weight loads are what the
pipeliner has to keep in flight.

The price is registers: ``BLOCK_T * BLOCK_H`` normalised activations live for the whole kernel, so this
path is for a few tokens at Qwen3's hidden sizes (``fits``). No ``tl.dot``: at one to a few tokens a
tensor-core tile would be mostly padding, and multiply-adds on CUDA cores are far under the weight
stream's time.
"""

import torch
import triton
import triton.language as tl

from vllm_mirage.ops._norm_gemv import _rms_scale, _silu_mul, prepare_gemv

# Activation elements (BLOCK_T * BLOCK_H) a program may hold: 32 fp32 registers a thread at 8 warps.
MAX_ROW_ELEMENTS = 8192
# Shared memory for the pipeliner's weight-slab buffers (it keeps STAGES - 1 of them; H100: 227 KB a block).
_SMEM_BUDGET = 200 * 1024


@triton.jit
def _row_dot(a, w):
    """``a [BLOCK_T, BLOCK_H] @ w [BLOCK_N, BLOCK_H].T`` in fp32 on CUDA cores."""
    return tl.sum(a[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _row_gemv_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, out_ptr, new_res_ptr,
    T, H, N, eps,
    stride_x, stride_res, stride_w, stride_out, stride_new_res,
    HAS_NORM: tl.constexpr,
    HAS_RES: tl.constexpr,
    SILU_MUL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    t_mask = offs_t < T
    h_mask = offs_h < H
    m = t_mask[:, None] & h_mask[None, :]
    dtype = out_ptr.dtype.element_ty

    a = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_h[None, :], mask=m, other=0.0)
    if HAS_NORM:
        if HAS_RES:
            # The residual stream is kept in the activation dtype: normalise the rounded sum.
            a = (a.to(tl.float32) + tl.load(res_ptr + offs_t[:, None] * stride_res + offs_h[None, :], mask=m,
                                            other=0.0).to(tl.float32)).to(dtype)
            # Program 0 writes x + residual; a predicated store, not an `if` around it.
            writer_t = t_mask & ((offs_t * 0 + pid) == 0)
            tl.store(new_res_ptr + offs_t[:, None] * stride_new_res + offs_h[None, :], a,
                     mask=writer_t[:, None] & h_mask[None, :])
        af = a.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(af * af, axis=1) / H + eps)
        nw = tl.load(nw_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        a = _rms_scale(a, rstd[:, None], nw[None, :], dtype)
    a = a.to(tl.float32)

    offs_n0 = tl.arange(0, BLOCK_N)
    for tile in tl.range(pid, tl.cdiv(N, BLOCK_N), tl.num_programs(0), num_stages=STAGES):
        offs_n = tile * BLOCK_N + offs_n0
        n_mask = offs_n < N
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_h[None, :]
        wm = n_mask[:, None] & h_mask[None, :]
        y = _row_dot(a, tl.load(w_rows, mask=wm, other=0.0))
        if SILU_MUL:
            # vLLM's merged gate_up weight: gate rows [0, N), up rows [N, 2N).
            up = _row_dot(a, tl.load(w_rows + N * stride_w, mask=wm, other=0.0))
            y = _silu_mul(y, up, dtype)
        out = out_ptr + offs_t[:, None] * stride_out + offs_n[None, :]
        tl.store(out, y.to(dtype), mask=t_mask[:, None] & n_mask[None, :])


def fits(T: int, H: int) -> bool:
    """Whether ``T`` whole rows of ``H`` activations fit this kernel's register budget."""
    return T >= 1 and triton.next_power_of_2(T) * triton.next_power_of_2(H) <= MAX_ROW_ELEMENTS


def default_config(T: int, H: int, N: int, silu_mul: bool = False) -> dict:
    """Launch shape by problem shape (no run-time autotuning: vLLM captures CUDA graphs).
    See docs/design.md for the sweep behind these numbers."""
    # Sweep (benchmarks/results/h100/2026-11-23-ops-row-sweep/): at H = 1024 narrow slabs and one per program were
    # best; from H = 2048 two programs an SM looping over 2-row slabs; 8 warps only helped at H = 4096.
    small = H <= 1024
    return {"BLOCK_N": 4 if small else 2, "PROGRAMS": (8 if small else 2) * _sm_count(), "STAGES": 3,
            "num_warps": 4 if H <= 2048 else 8}


_SM_COUNT: dict[int, int] = {}


def _sm_count() -> int:
    if not torch.cuda.is_available():
        return 4  # the interpreter runs programs one after another; a few exercise the persistent loop
    dev = torch.cuda.current_device()
    if dev not in _SM_COUNT:
        _SM_COUNT[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _SM_COUNT[dev]


def row_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    silu_mul: bool = False,
    out: torch.Tensor | None = None,
    new_residual: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as ``_norm_gemv.norm_gemv``, for shapes where ``fits(T, H)``."""
    assert fits(*x.shape), f"{x.shape[0]} rows of {x.shape[1]} do not fit the row GEMV's registers"
    g = prepare_gemv(x, weight, norm_weight, eps, residual, silu_mul, out, new_residual)
    cfg = {**default_config(g.T, g.H, g.N, silu_mul), **(config or {})}
    programs = min(cfg.pop("PROGRAMS"), triton.cdiv(g.N, cfg["BLOCK_N"]))
    slab_bytes = (2 if silu_mul else 1) * cfg["BLOCK_N"] * triton.next_power_of_2(g.H) * x.element_size()
    cfg["STAGES"] = max(1, min(cfg["STAGES"], 1 + _SMEM_BUDGET // slab_bytes))
    _row_gemv_kernel[(programs,)](
        *g.args, **g.flags,
        BLOCK_T=triton.next_power_of_2(g.T),
        BLOCK_H=triton.next_power_of_2(g.H),
        **cfg,
    )
    return g.out, g.new_residual

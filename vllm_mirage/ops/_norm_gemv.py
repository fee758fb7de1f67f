"""The decode-shaped matmul shared by the norm+linear ops: RMSNorm folded into GEMV-style tiles, optional
SiLU-and-mul epilogue.

At decode sizes (a few tokens) a linear layer is a weight stream: every weight byte is read once and
used for only ``T`` multiply-adds, so the kernel's job is to keep HBM busy. Each program owns a
``BLOCK_N`` slice of output features for a ``BLOCK_T`` block of tokens and streams the matching weight
rows in ``BLOCK_K`` chunks. The activations are tiny and L2-resident, so every program re-reads them
(the Mirage trick: recompute instead of a second launch); normalised activations never reach memory.

Each program first makes a pass over x (+ residual) for the RMS, then streams its weight rows and
normalises each activation chunk in registers just before the dot, with RMSNorm's rounding points.
(A one-pass variant that feeds ``x * norm_weight`` to the dot and applies ``rstd`` in the epilogue was
measured and lost at every shape: docs/design.md.)

``tl.dot`` needs at least 16 rows; padding T up to 16 costs tensor-core cycles we have to spare.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vllm_mirage.ops._dispatch import interpreted

@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # Triton's interpreter computes bf16 dots wrongly, and fp32 must not silently drop to tf32.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _rms_scale(x, rstd, weight, dtype: tl.constexpr):
    """RMSNorm's rounding points: normalise in fp32, round, scale by the (fp32) weight, round."""
    return ((x.to(tl.float32) * rstd).to(dtype).to(tl.float32) * weight).to(dtype)


@triton.jit
def _silu_mul(gate_acc, up_acc, dtype: tl.constexpr):
    """SiLU(gate) * up with the unfused path's rounding points: linear outputs, then SiLU, then the product."""
    gate = gate_acc.to(dtype).to(tl.float32)
    return (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up_acc.to(dtype).to(tl.float32)


@triton.jit
def _norm_gemv_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, out_ptr, new_res_ptr,
    T, H, N, eps,
    stride_x, stride_res, stride_w, stride_out, stride_new_res,
    HAS_NORM: tl.constexpr,
    HAS_RES: tl.constexpr,
    SILU_MUL: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM_BLOCK_K: tl.constexpr,
    NORM_STAGES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = offs_t < T
    n_mask = offs_n < N
    x_rows = x_ptr + offs_t[:, None].to(tl.int64) * stride_x
    res_rows = res_ptr + offs_t[:, None].to(tl.int64) * stride_res
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
    dtype = out_ptr.dtype.element_ty

    if HAS_NORM:
        # The RMS needs all of H before the first normalised chunk. This loop has no dot, so Triton
        # only pipelines it when asked (tl.range num_stages): otherwise every chunk is a serial L2 round
        # trip, which at H = 4096 cost more than the weight stream (docs/design.md).
        # One program per token block also writes x + residual, with a predicated store rather than
        # an `if`, which keeps the loop body branch-free.
        writer_t = t_mask & ((offs_t * 0 + pid_n) == 0)
        offs_nk = tl.arange(0, NORM_BLOCK_K)
        sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
        for k0 in tl.range(0, H, NORM_BLOCK_K, num_stages=NORM_STAGES):
            k = k0 + offs_nk
            m = t_mask[:, None] & (k < H)[None, :]
            xv = tl.load(x_rows + k[None, :], mask=m, other=0.0)
            if HAS_RES:
                # The residual stream is stored in the activation dtype: normalise the rounded sum.
                xv = (xv.to(tl.float32) + tl.load(res_rows + k[None, :], mask=m, other=0.0).to(tl.float32)).to(dtype)
                new_res = new_res_ptr + offs_t[:, None].to(tl.int64) * stride_new_res + k[None, :]
                tl.store(new_res, xv, mask=writer_t[:, None] & (k < H)[None, :])
            xf = xv.to(tl.float32)
            sumsq += tl.sum(xf * xf, axis=1)
        rstd = tl.rsqrt(sumsq / H + eps)

    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    if SILU_MUL:
        acc_up = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < H
        m = t_mask[:, None] & k_mask[None, :]
        a = tl.load(x_rows + k[None, :], mask=m, other=0.0)
        if HAS_NORM:
            if HAS_RES:
                a = (a.to(tl.float32) + tl.load(res_rows + k[None, :], mask=m, other=0.0).to(tl.float32)).to(dtype)
            nw = tl.load(nw_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            a = _rms_scale(a, rstd[:, None], nw[None, :], dtype)
        wm = n_mask[:, None] & k_mask[None, :]
        acc += _dot(a, tl.trans(tl.load(w_rows + k[None, :], mask=wm, other=0.0)), UPCAST)
        if SILU_MUL:
            # vLLM's merged gate_up weight: gate rows [0, N), up rows [N, 2N).
            acc_up += _dot(a, tl.trans(tl.load(w_rows + N * stride_w + k[None, :], mask=wm, other=0.0)), UPCAST)

    if SILU_MUL:
        y = _silu_mul(acc, acc_up, dtype)
    else:
        y = acc
    out = out_ptr + offs_t[:, None].to(tl.int64) * stride_out + offs_n[None, :]
    tl.store(out, y.to(dtype), mask=t_mask[:, None] & n_mask[None, :])


@triton.jit
def _silu_mul_kernel(y_ptr, out_ptr, I, stride_y, stride_out, BLOCK: tl.constexpr):
    # Epilogue of the unfused (cuBLAS) path: one pass over [gate | up] instead of eager torch's three.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0)
    up = tl.load(y_ptr + row * stride_y + I + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # F.silu rounds to the activation dtype before the multiply: so do we.
    y = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(gate.dtype), mask=mask)


def silu_mul_triton(y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(y[:, :I]) * y[:, I:]`` for ``y`` of shape ``[T, 2I]`` with unit column stride."""
    T, I = y.shape[0], y.shape[1] // 2
    out = y.new_empty((T, I)) if out is None else out
    if T > 0:
        block = min(1024, triton.next_power_of_2(I))
        _silu_mul_kernel[(T, triton.cdiv(I, block))](y, out, I, y.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out


# Shared memory the pipeliner may use for its stages (H100: 227 KB per block; leave room for the
# epilogue's layout conversions).
_SMEM_BUDGET = 160 * 1024


def default_config(T: int, H: int, N: int, silu_mul: bool = False, elem_size: int = 2) -> dict:
    """Block sizes by shape. No run-time autotuning: vLLM captures CUDA graphs, and a first call inside
    a capture must not benchmark. See docs/design.md for the sweep behind these numbers."""
    cfg = {
        # One token block covers every token up to 64, so each weight byte leaves HBM once.
        "BLOCK_T": min(64, max(16, triton.next_power_of_2(T))),
        # Sweep: BLOCK_N 32 x BLOCK_K 256 was best or within 2% of best at every Qwen3 shape.
        "BLOCK_N": 32,
        "BLOCK_K": min(256, max(16, triton.next_power_of_2(H))),
        "num_warps": 4,
        # The RMS pre-pass: fewer, wider chunks, pipelined (see the kernel).
        "NORM_BLOCK_K": min(512, max(16, triton.next_power_of_2(H))),
        "NORM_STAGES": 3,
    }
    while cfg["BLOCK_K"] > 32 and 2 * _stage_bytes(cfg, silu_mul, elem_size) > _SMEM_BUDGET:
        cfg["BLOCK_K"] //= 2
    # The RMS pre-pass buffers x and residual tiles per stage; shrink it for big token blocks / fp32.
    norm_stage = lambda: 2 * cfg["BLOCK_T"] * cfg["NORM_BLOCK_K"] * elem_size  # noqa: E731
    while cfg["NORM_BLOCK_K"] > 64 and cfg["NORM_STAGES"] * norm_stage() > _SMEM_BUDGET // 2:
        cfg["NORM_BLOCK_K"] //= 2
    if cfg["NORM_STAGES"] * norm_stage() > _SMEM_BUDGET // 2:
        cfg["NORM_STAGES"] = 1
    return cfg


def _stage_bytes(cfg: dict, silu_mul: bool, elem_size: int) -> int:
    # Per pipeline stage: the x and residual tiles and one weight tile (two with SiLU-mul).
    rows = 2 * cfg["BLOCK_T"] + (2 if silu_mul else 1) * cfg["BLOCK_N"]
    return rows * cfg["BLOCK_K"] * elem_size


def _num_stages(cfg: dict, silu_mul: bool, elem_size: int) -> int:
    return max(2, min(4, _SMEM_BUDGET // _stage_bytes(cfg, silu_mul, elem_size)))


class GemvLaunch(NamedTuple):
    """A decode GEMV call, checked and with its outputs allocated: ``args`` and ``flags`` are the leading
    parameters both GEMV kernels (this file's and ``_row_gemv.py``'s) share."""

    T: int
    H: int
    N: int
    out: torch.Tensor
    new_residual: torch.Tensor | None
    args: tuple
    flags: dict


def prepare_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    silu_mul: bool,
    out: torch.Tensor | None,
    new_residual: torch.Tensor | None,
) -> GemvLaunch:
    x = x.contiguous()
    T, H = x.shape
    N = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    assert weight.shape[1] == H and weight.stride(1) == 1, "weight must be [N, H] with unit column stride"
    out = x.new_empty((T, N)) if out is None else out
    has_res = residual is not None
    if has_res:
        residual = residual.contiguous()
        new_residual = torch.empty_like(x) if new_residual is None else new_residual
    # Unused pointers get a real tensor (the kernel never dereferences them) and stride 0.
    args = (
        x, residual if has_res else x, norm_weight if norm_weight is not None else weight,
        weight, out, new_residual if has_res else out,
        T, H, N, eps,
        x.stride(0), residual.stride(0) if has_res else 0, weight.stride(0), out.stride(0),
        new_residual.stride(0) if has_res else 0,
    )
    flags = {"HAS_NORM": norm_weight is not None, "HAS_RES": has_res, "SILU_MUL": silu_mul}
    return GemvLaunch(T, H, N, out, new_residual, args, flags)


def norm_gemv(
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
    """Launch the fused kernel for any T. Returns ``(out, new_residual or None)``.

    ``out``/``new_residual`` may be passed in (tests poison them); ``config`` overrides the block sizes.
    """
    g = prepare_gemv(x, weight, norm_weight, eps, residual, silu_mul, out, new_residual)
    elem = x.element_size()
    cfg = {**default_config(g.T, g.H, g.N, silu_mul, elem), **(config or {})}
    cfg.setdefault("num_stages", _num_stages(cfg, silu_mul, elem))
    block_t = cfg.pop("BLOCK_T")
    if g.T > 0:
        grid = (triton.cdiv(g.N, cfg["BLOCK_N"]), triton.cdiv(g.T, block_t))
        _norm_gemv_kernel[grid](
            *g.args, **g.flags,
            UPCAST=interpreted() or x.dtype == torch.float32,
            BLOCK_T=block_t,
            **cfg,
        )
    return g.out, g.new_residual

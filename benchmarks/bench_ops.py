"""Time each fused op against the unfused kernels it replaces, on Qwen3 shapes (CUDA only).

    python benchmarks/bench_ops.py --tokens 1 2 4 8 64 512 --output ops.json
    python benchmarks/bench_ops.py --models qwen3-8b --row-sweep 1 2 4 8 --output row_sweep_qwen3-8b.json

Method: every variant is checked against the PyTorch reference
first; then R calls, each on its own copy of the weights (R copies exceed the 50 MB L2, so we measure
HBM, not cache), are captured in one CUDA graph, and the graph replay is timed with
``triton.testing.do_bench`` (median) and divided by R. Graphs remove Python and launch overhead,
as vLLM's decode does. The copy bandwidth measured in the same run is the roofline.

Unfused baselines are what stock vLLM launches, built from single kernels of equal quality:
norm = our one-kernel add+RMSNorm (like vLLM's fused_add_rms_norm), GEMM = cuBLAS
(``F.linear``), SiLU·mul and rotary = one torch.compile'd (inductor) kernel each, q/k norm = two.
"""

import argparse
import itertools
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_mirage import ops  # noqa: E402
from vllm_mirage.ops import reference  # noqa: E402
from vllm_mirage.ops._linear_paths import linear_path  # noqa: E402
from vllm_mirage.ops._norm_gemv import default_config, norm_gemv  # noqa: E402
from vllm_mirage.ops._row_gemv import fits, row_gemv  # noqa: E402
from vllm_mirage.ops.add_rms_norm import rms_norm_triton  # noqa: E402
from vllm_mirage.tuning.timing import copies_for, copy_bandwidth, graph_time_us  # noqa: E402

MODELS = {  # H, q heads, kv heads, head_dim, I
    "qwen3-0.6b": (1024, 16, 8, 128, 3072),
    "qwen3-1.7b": (2048, 16, 8, 128, 6144),
    "qwen3-8b": (4096, 32, 8, 128, 12288),
    "qwen3-32b": (5120, 64, 8, 128, 25600),  # the family's widest rows: BLOCK_H 8192 in the row GEMV
}
DEFAULT_MODELS = ["qwen3-0.6b", "qwen3-1.7b", "qwen3-8b"]
EPS = 1e-6
DT = torch.bfloat16


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# Unfused pieces that stock vLLM launches one kernel each for.
silu_mul_compiled = torch.compile(lambda y: F.silu(y[:, : y.shape[1] // 2]) * y[:, y.shape[1] // 2 :], dynamic=True)
head_rms_compiled = torch.compile(lambda x, w, d: reference._rms_norm(x.view(x.shape[0], -1, d), w, EPS).view(x.shape[0], -1), dynamic=True)


def _rope(q, k, pos, cache):
    d = cache.shape[1]
    cos, sin = cache[pos].float().chunk(2, dim=-1)

    def rot(x):
        h = x.view(x.shape[0], -1, d).float()
        x1, x2 = h.chunk(2, dim=-1)
        c, s = cos[:, None], sin[:, None]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1).to(x.dtype).view(x.shape)

    return rot(q), rot(k)


rope_compiled = torch.compile(_rope, dynamic=True)


def bench_linear_ops(name, H, N_rows, T, silu, cfg=None, norm=True, force_gemv=False, time_unfused=True,
                     with_residual=True, row_cfg=None):
    """rms_norm_linear (silu=False, weight [N, H]) or rms_norm_linear_silu_mul (silu=True, [2I, H]),
    both with a residual, as in every layer but the first; ``norm=False`` gives linear_silu_mul.
    ``cfg``/``force_gemv`` run the chunked GEMV kernel, ``row_cfg`` the whole-row one, whatever the shape
    rule says. Returns a result row."""
    wbytes = N_rows * H * 2
    R = copies_for(wbytes)
    weights = [torch.randn(N_rows, H, device="cuda", dtype=DT) * H**-0.5 for _ in range(R)]
    x = torch.randn(T, H, device="cuda", dtype=DT)
    res = torch.randn(T, H, device="cuda", dtype=DT) if norm and with_residual else None
    nw = (1 + 0.3 * torch.randn(H, device="cuda")).to(DT) if norm else None
    n_out = N_rows // 2 if silu else N_rows

    def fused(i):
        if row_cfg is not None:
            return row_gemv(x, weights[i], nw, EPS, residual=res, silu_mul=silu, config=row_cfg)
        if cfg is not None or force_gemv:
            return norm_gemv(x, weights[i], nw, EPS, residual=res, silu_mul=silu, config=cfg)
        if not norm:
            return ops.linear_silu_mul(x, weights[i]), None
        op = ops.rms_norm_linear_silu_mul if silu else ops.rms_norm_linear
        y = op(x, nw, weights[i], EPS, residual=res)
        return y if isinstance(y, tuple) else (y, None)

    def unfused(i):
        normed, new_res = rms_norm_triton(x, nw, EPS, residual=res) if norm else (x, None)
        y = F.linear(normed, weights[i])
        return (silu_mul_compiled(y) if silu else y), new_res

    if not norm:
        ref_out = reference.linear_silu_mul(x.float(), weights[0].float())
    else:
        ref_fn = reference.rms_norm_linear_silu_mul if silu else reference.rms_norm_linear
        ref_out = ref_fn(x.float(), nw.float(), weights[0].float(), EPS,
                         residual=None if res is None else res.float())
        ref_out = ref_out[0] if isinstance(ref_out, tuple) else ref_out
    err = rel_err(fused(0)[0], ref_out)
    assert err < 1e-2, f"{name} T={T} cfg={cfg}: fused relative error {err:.2e}"
    t_f = graph_time_us(fused, R)
    row = {"fused_us": t_f, "err_fused": err}
    if time_unfused:
        row.update(unfused_us=graph_time_us(unfused, R), err_unfused=rel_err(unfused(0)[0], ref_out))
    acts = (3 * T * H if norm else T * H) + T * n_out  # x (+ residual in and out), output
    row["bytes"] = wbytes + acts * 2
    return row


def bench_qk_norm_rope(hq, hk, D, T):
    R = 64
    qkvs = [torch.randn(T, (hq + 2 * hk) * D, device="cuda", dtype=DT) for _ in range(R)]
    splits = [q.split([hq * D, hk * D, hk * D], dim=-1) for q in qkvs]
    qw, kw = [(1 + 0.3 * torch.randn(D, device="cuda")).to(DT) for _ in range(2)]
    pos = torch.randint(0, 4096, (T,), device="cuda")
    cache = torch.randn(40960, D, device="cuda").to(DT)

    def fused(i):
        q, k, _ = splits[i]
        return ops.qk_norm_rope(q, k, qw, kw, pos, cache, EPS)

    def unfused(i):
        q, k, _ = splits[i]
        return rope_compiled(head_rms_compiled(q, qw, D), head_rms_compiled(k, kw, D), pos, cache)

    q, k, _ = splits[0]
    ref = reference.qk_norm_rope(q.float(), k.float(), qw.float(), kw.float(), pos, cache.float(), EPS)
    err = max(rel_err(a, b) for a, b in zip(fused(0), ref))
    assert err < 1e-2, f"qk_norm_rope T={T}: relative error {err:.2e}"
    t_f, t_u = graph_time_us(fused, R), graph_time_us(unfused, R)
    moved = 2 * T * (hq + hk) * D * 2 + T * D * 2 * 2  # q, k in and out; cos/sin rows
    return {"fused_us": t_f, "unfused_us": t_u, "bytes": moved, "err_fused": err}


def bench_add_rms_norm(H, T):
    R = 64
    xs = [torch.randn(T, H, device="cuda", dtype=DT) for _ in range(R)]
    rs = [torch.randn(T, H, device="cuda", dtype=DT) for _ in range(R)]
    w = (1 + 0.3 * torch.randn(H, device="cuda")).to(DT)
    compiled = torch.compile(lambda x, r, w: reference.add_rms_norm(x, r, w, EPS), dynamic=True)
    fused = lambda i: ops.add_rms_norm(xs[i], rs[i], w, EPS)  # noqa: E731
    unfused = lambda i: compiled(xs[i], rs[i], w)  # noqa: E731
    ref = reference.add_rms_norm(xs[0].float(), rs[0].float(), w.float(), EPS)[0]
    err = rel_err(fused(0)[0], ref)
    assert err < 1e-2
    return {"fused_us": graph_time_us(fused, R), "unfused_us": graph_time_us(unfused, R),
            "bytes": 4 * T * H * 2, "err_fused": err}


def sweep(models, tokens):
    """Block-size sweep of the fused GEMV kernel, to justify default_config()."""
    rows = []
    grid = list(itertools.product([1, 3], [256, 512, 1024], [32, 64], [256]))
    for model in models:
        H, hq, hk, D, I = MODELS[model]
        for what, n_rows, silu in (("qkv", (hq + 2 * hk) * D, False), ("gate_up", 2 * I, True)):
            for T in tokens:
                best = None
                for ns, nbk, bn, bk in grid:
                    cfg = {"NORM_STAGES": ns, "NORM_BLOCK_K": nbk, "BLOCK_N": bn, "BLOCK_K": bk}
                    try:
                        r = bench_linear_ops(what, H, n_rows, T, silu, cfg=cfg, time_unfused=False)
                    except Exception as e:  # e.g. out of shared memory for big tiles
                        print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                        continue
                    rows.append({"model": model, "op": what, "T": T, **cfg, "us": r["fused_us"]})
                    if best is None or r["fused_us"] < best[1]:
                        best = (cfg, r["fused_us"])
                default = default_config(T, H, n_rows // 2 if silu else n_rows, silu)
                d_us = [x["us"] for x in rows if x["model"] == model and x["op"] == what and x["T"] == T
                        and all(x[k] == default[k] for k in ("NORM_STAGES", "NORM_BLOCK_K", "BLOCK_N", "BLOCK_K"))]
                no_res = bench_linear_ops(what, H, n_rows, T, silu, force_gemv=True, time_unfused=False,
                                          with_residual=False)["fused_us"]
                rows.append({"model": model, "op": what + " (no residual)", "T": T, **default, "us": no_res})
                print(f"sweep {model} {what} T={T}: best {best[0]} {best[1]:.2f} us; default {default} "
                      f"{d_us[0] if d_us else float('nan'):.2f} us; default without residual {no_res:.2f} us", flush=True)
    return rows


LINEAR_OPS = (("qkv", False, True), ("gate_up", True, True), ("gate_up (no norm)", True, False))


def row_sweep(models, tokens):
    """The whole-row GEMV (``_row_gemv.py``) over launch shapes, next to the chunked GEMV and norm + cuBLAS
    timed in the same process: to choose its default_config and the shape rule."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    first = [{"BLOCK_N": bn, "PROGRAMS": p * sms, "STAGES": 3, "num_warps": 8}
             for bn in (2, 4, 8) for p in (1, 2, 4, 8)]
    rows = []
    for model in models:
        H, hq, hk, D, I = MODELS[model]
        for what, silu, norm in LINEAR_OPS:
            n_rows = 2 * I if silu else (hq + 2 * hk) * D
            for T in (t for t in tokens if fits(t, H)):
                base = bench_linear_ops(what, H, n_rows, T, silu, norm=norm, force_gemv=True)
                row = {"model": model, "op": what, "T": T, "chunked_gemv_us": base["fused_us"],
                       "unfused_us": base["unfused_us"], "bytes": base["bytes"], "configs": []}

                def run(cfg):
                    try:
                        us = bench_linear_ops(what, H, n_rows, T, silu, norm=norm, row_cfg=dict(cfg),
                                              time_unfused=False)["fused_us"]
                    except Exception as e:  # e.g. out of registers; keep the record and go on
                        print(f"  {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        us = float("inf")
                    row["configs"].append({**cfg, "us": us})

                def best():
                    return min(row["configs"], key=lambda c: c["us"])

                for cfg in first:
                    run(cfg)
                # Then stages and warps around the best slab width and grid.
                around = {k: v for k, v in best().items() if k != "us"}
                for cfg in ({**around, "STAGES": 2}, {**around, "STAGES": 4}, {**around, "num_warps": 4}):
                    run(cfg)
                row["best"] = best()
                row["best_us"] = row["best"]["us"]
                rows.append(row)
                print(f"row sweep {model} {what} T={T}: best {row['best']} us; chunked GEMV "
                      f"{row['chunked_gemv_us']:.2f} us; norm+cuBLAS {row['unfused_us']:.2f} us; "
                      f"x{row['unfused_us'] / row['best_us']:.2f} vs unfused", flush=True)
    return rows


def crossover(models, tokens):
    """The fused GEMV kernel forced at prefill-ish T against the unfused norm + cuBLAS path: where the
    shape rule (GEMV_MAX_TOKENS) should switch."""
    rows = []
    for model in models:
        H, hq, hk, D, I = MODELS[model]
        for what, n_rows, silu in (("qkv", (hq + 2 * hk) * D, False), ("gate_up", 2 * I, True)):
            for T in tokens:
                r = bench_linear_ops(what, H, n_rows, T, silu, force_gemv=True)
                rows.append({"model": model, "op": what, "T": T, "gemv_us": r["fused_us"], "unfused_us": r["unfused_us"]})
                print(f"crossover {model} {what} T={T}: forced GEMV {r['fused_us']:.2f} us, "
                      f"norm+cuBLAS {r['unfused_us']:.2f} us", flush=True)
    return rows


def _path(op: str, T: int, H: int) -> str:
    if "linear" not in op:
        return "fused"
    has_norm, silu = op.startswith("rms_norm"), "silu" in op
    return linear_path(T, H, has_norm, silu)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 512])
    p.add_argument("--sweep", action="store_true", help="also sweep GEMV block sizes at T=1 and 8")
    p.add_argument("--row-sweep", nargs="*", type=int, default=None, metavar="T",
                   help="only sweep the whole-row GEMV's launch shapes at these T (default 1 2 4 8)")
    p.add_argument("--crossover", nargs="*", type=int, default=[], metavar="T",
                   help="also time the forced GEMV kernel against norm+cuBLAS at these T")
    p.add_argument("--output", default="ops.json")
    args = p.parse_args()

    torch.manual_seed(0)
    bw = copy_bandwidth()
    rows = []
    if args.row_sweep is not None:
        sweep_rows = row_sweep(args.models, args.row_sweep or [1, 2, 4, 8])
        for r in sweep_rows:
            r["best_bw_pct"] = 100 * r["bytes"] / (r["best_us"] * 1e-6) / bw
        args.models = []  # the sweep alone
    for model in args.models:
        H, hq, hk, D, I = MODELS[model]
        for T in args.tokens:
            cases = {
                "rms_norm_linear (norm+QKV)": lambda: bench_linear_ops("qkv", H, (hq + 2 * hk) * D, T, False),
                "rms_norm_linear_silu_mul (norm+gate_up+SiLU)": lambda: bench_linear_ops("gate_up", H, 2 * I, T, True),
                "linear_silu_mul (gate_up+SiLU)": lambda: bench_linear_ops("gate_up", H, 2 * I, T, True, norm=False),
                "qk_norm_rope": lambda: bench_qk_norm_rope(hq, hk, D, T),
                "add_rms_norm": lambda: bench_add_rms_norm(H, T),
            }
            for op, run in cases.items():
                try:
                    r = run()
                except Exception as e:  # keep the other rows; the error is part of the record
                    print(f"{model} T={T} {op}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    rows.append({"model": model, "op": op, "T": T, "error": f"{type(e).__name__}: {e}"[:500]})
                    continue
                r.update(model=model, op=op, T=T, speedup=r["unfused_us"] / r["fused_us"],
                         fused_bw_pct=100 * r["bytes"] / (r["fused_us"] * 1e-6) / bw,
                         unfused_bw_pct=100 * r["bytes"] / (r["unfused_us"] * 1e-6) / bw,
                         path=_path(op, T, H))
                rows.append(r)
                print(f"{model:11s} T={T:<4d} {op:46s} fused {r['fused_us']:8.2f} us  unfused "
                      f"{r['unfused_us']:8.2f} us  x{r['speedup']:.2f}  BW {r['fused_bw_pct']:5.1f}%", flush=True)

    if args.row_sweep is None:
        sweep_rows = sweep(args.models, [1, 8]) if args.sweep else []
    cross_rows = crossover(args.models, args.crossover) if args.crossover else []
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "dtype": "bfloat16",
        "copy_bandwidth_GBps": bw / 1e9,
        "command": " ".join(sys.argv),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"meta": meta, "results": rows, "sweep": sweep_rows, "crossover": cross_rows}, indent=1))
    print(f"\ncopy bandwidth {bw / 1e9:.0f} GB/s on {meta['gpu']}")
    print("| model | T | op | path | fused µs | unfused µs | speed-up | fused % of copy BW | unfused % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['T']} | {r['op']} | FAILED | | | | | |")
            continue
        print(f"| {r['model']} | {r['T']} | {r['op']} | {r['path']} | {r['fused_us']:.2f} | {r['unfused_us']:.2f} | "
              f"{r['speedup']:.2f}× | {r['fused_bw_pct']:.0f}% | {r['unfused_bw_pct']:.0f}% |")


if __name__ == "__main__":
    main()

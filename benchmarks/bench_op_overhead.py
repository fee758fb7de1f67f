"""Host time per call of the fused ops outside CUDA graphs (prefill above the captured sizes), three ways.

    python3 benchmarks/bench_op_overhead.py --tokens 40 --output X.json

For each op of a Qwen3 layer's prefill, on Qwen3-0.6B shapes: the op's body called as a Python function
(no dispatcher), the op as this package registers it (``torch.ops.vllm_mirage.*``, straight to the
backend), and the same body behind ``torch.library.custom_op`` (how the ops were registered before).
The calls are host-bound at these sizes (a 40-token GEMM is a few µs of GPU work), so the wall time of
``calls`` back-to-back calls, synchronised once at the end, is host time. Median of ``repeats``; the three
ways alternate within each repeat so that the host's drift hits them alike. Runs on CPU too (the PyTorch
reference as the body), where it measures the dispatcher alone.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_mirage import ops  # noqa: E402
from vllm_mirage.ops._linear_paths import fused_or_unfused  # noqa: E402
from vllm_mirage.ops.qk_norm_rope import qk_norm_rope_triton  # noqa: E402

H, HQ, HKV, D, I = 1024, 16, 8, 128, 3072  # Qwen3-0.6B
EPS = 1e-6


def _bodies(on_gpu: bool) -> dict:
    """What each op runs, as plain functions; on CPU the reference, as the ops do there."""
    ref = ops.reference
    if on_gpu:
        def norm_qkv(x, r, nw, w):
            return fused_or_unfused(x, w, nw, EPS, residual=r)

        def norm_gate_up(x, r, nw, w):
            return fused_or_unfused(x, w, nw, EPS, residual=r, silu_mul=True)

        def qk(q, k, qw, kw, pos, cache):
            return qk_norm_rope_triton(q, k, qw, kw, pos, cache, EPS)
    else:
        def norm_qkv(x, r, nw, w):
            return ref.rms_norm_linear(x, nw, w, EPS, residual=r)

        def norm_gate_up(x, r, nw, w):
            return ref.rms_norm_linear_silu_mul(x, nw, w, EPS, residual=r)

        def qk(q, k, qw, kw, pos, cache):
            return ref.qk_norm_rope(q, k, qw, kw, pos, cache, EPS)
    return {"add_rms_norm_linear": norm_qkv, "add_rms_norm_linear_silu_mul": norm_gate_up, "qk_norm_rope": qk}


def _as_custom_op(name: str, body):
    """The body behind ``torch.library.custom_op``, as the ops were registered before."""
    T = torch.Tensor
    if name == "qk_norm_rope":
        def fn(q: T, k: T, qw: T, kw: T, pos: T, cache: T) -> tuple[T, T]:
            return body(q, k, qw, kw, pos, cache)
    else:
        def fn(x: T, r: T, nw: T, w: T) -> tuple[T, T]:
            return body(x, r, nw, w)
    return torch.library.custom_op(f"bench_op_overhead::{name}", fn, mutates_args=())


def _args(name: str, T: int, device, dtype) -> tuple:
    def t(*shape, scale=1.0):
        return torch.randn(*shape, device=device, dtype=dtype) * scale

    if name == "qk_norm_rope":
        return (t(T, HQ * D), t(T, HKV * D), t(D), t(D), torch.arange(T, device=device), t(4096, D))
    rows = 2 * I if name.endswith("silu_mul") else (HQ + 2 * HKV) * D
    return (t(T, H), t(T, H), t(H), t(rows, H, scale=0.02))


def _registered(name: str):
    op = getattr(torch.ops.vllm_mirage, name).default  # what the package's wrappers call
    if name == "qk_norm_rope":
        return lambda *a: op(*a, EPS)
    return lambda x, r, nw, w: op(x, r, nw, w, EPS)


def _host_us(fn, args, calls: int, sync) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    sync()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    rows = []
    for name, body in _bodies(on_gpu).items():
        a = _args(name, args.tokens, device, dtype)
        ways = {"python call": body, "torch.ops (direct registration)": _registered(name),
                "torch.library.custom_op": _as_custom_op(name, body)}
        for fn in ways.values():  # warm-up: compile, settle the allocator
            _host_us(fn, a, 20, sync)
        times = {way: [] for way in ways}
        for _ in range(args.repeats):
            for way, fn in ways.items():
                times[way].append(_host_us(fn, a, args.calls, sync))
        row = {"op": name, "tokens": args.tokens, **{w: round(statistics.median(v), 2) for w, v in times.items()}}
        rows.append(row)
        print(f"{name:32s} " + "  ".join(f"{w} {row[w]:7.2f} us" for w in ways))
    result = {"device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
              "torch": torch.__version__, "python": platform.python_version(), "calls": args.calls,
              "repeats": args.repeats, "rows": rows}
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

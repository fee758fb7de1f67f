"""Time the megakernel decode step on a GPU against the bandwidth floor measured in the same run.

    python benchmarks/bench_megakernel.py --out benchmarks/results/megakernel_h100.json

Qwen3-0.6B and Qwen3-8B shapes with random bf16 weights, batch 1/8/64, context 128 per request. The step
runs under a CUDA graph (as vLLM would run it); the floor is the bytes the step must read (weights +
the KV cache it attends over) divided by the device-to-device copy bandwidth measured here.
Not run yet (written at the end of a session without device time): treat its first output as new.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.megakernel.conftest import random_batch, random_weights  # noqa: E402
from vllm_mirage.megakernel import kernel  # noqa: E402
from vllm_mirage.megakernel.graph import build_task_graph  # noqa: E402
from vllm_mirage.megakernel.state import DecodeBuffers  # noqa: E402

SHAPES = {
    "qwen3-0.6b": dict(hidden=1024, inter=3072, hq=16, hkv=8, d=128, layers=28, vocab=151936),
    "qwen3-8b": dict(hidden=4096, inter=12288, hq=32, hkv=8, d=128, layers=36, vocab=151936),
}


def copy_bandwidth() -> float:
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200)
    return 2 * a.numel() / (ms * 1e-3)


def step_bytes(cfg: dict, batch: int, context: int) -> int:
    h, i, d, L = cfg["hidden"], cfg["inter"], cfg["d"], cfg["layers"]
    per_layer = ((cfg["hq"] + 2 * cfg["hkv"]) * d * h + h * cfg["hq"] * d + 3 * i * h + 2 * h + 2 * d) * 2
    kv = 2 * L * batch * context * cfg["hkv"] * d * 2
    return L * per_layer + cfg["vocab"] * h * 2 + kv


def bench(name: str, batch: int, context: int, bandwidth: float, split: bool) -> dict:
    cfg = SHAPES[name]
    weights = random_weights(**cfg, dtype=torch.bfloat16, device="cuda")
    blocks = batch * (context // 16 + 1)
    kvb = random_batch([context] * batch, layers=cfg["layers"], hkv=cfg["hkv"], d=cfg["d"], dtype=torch.bfloat16,
                       num_blocks=blocks, layout="fa_packed", device="cuda")
    workers = torch.cuda.get_device_properties(0).multi_processor_count
    shape = weights.shape(batch=batch)
    shape = shape.with_splits_for(workers) if split else shape
    graph = build_task_graph(shape, workers).to("cuda")
    buffers = DecodeBuffers(shape, torch.bfloat16, "cuda")
    buffers.load_input(torch.randn(batch, cfg["hidden"], device="cuda").to(torch.bfloat16))
    wtab = weights.pointer_table()
    kvtab = kernel.kv_pointer_table(kvb)
    run = lambda: kernel.decode_step(graph, weights, kvb, buffers, wtab, kvtab)  # noqa: E731
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        run()
    ms = triton.testing.do_bench(g.replay, warmup=10, rep=200)
    floor_ms = step_bytes(cfg, batch, context) / bandwidth * 1e3
    return {"model": name, "batch": batch, "context": context, "split_o": shape.split_o,
            "split_down": shape.split_down, "step_ms": ms, "floor_ms": floor_ms, "fraction_of_floor": floor_ms / ms}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs="+", default=list(SHAPES))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=128)
    args = ap.parse_args()
    bw = copy_bandwidth()
    rows = []
    for name in args.models:
        for b in args.batch_sizes:
            for split in (False, True):  # split-K off and as with_splits_for picks it, side by side
                rows.append(bench(name, b, args.context, bw, split))
                r = rows[-1]
                print(f"{name} batch {b} split-K {r['split_o']}/{r['split_down']}: {r['step_ms']:.3f} ms/step, "
                      f"floor {r['floor_ms']:.3f} ms ({100 * r['fraction_of_floor']:.0f}% of it)", flush=True)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "copy_bandwidth_bytes_per_s": bw, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

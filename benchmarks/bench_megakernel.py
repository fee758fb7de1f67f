"""Time the megakernel decode step on a GPU against the bandwidth floor measured in the same run.

    python benchmarks/bench_megakernel.py --out megakernel.json
    python benchmarks/bench_megakernel.py --models qwen3-8b --batch-sizes 1 8 --configs '[{}, {"stages": 4}]' --out OUT.json

Qwen3-0.6B and Qwen3-8B shapes with random bf16 weights, batch 1/8/64, context 128 per request (or
``--context``). The step runs under a CUDA graph (as vLLM would run it); the floor is the bytes the step
must read (weights + the KV cache it attends over) divided by the device-to-device copy bandwidth
measured here. Launch configurations are timed side by side; one traced run per shape says where the
time goes per stage.
"""

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.megakernel.conftest import random_batch, random_weights  # noqa: E402
from vllm_mirage.megakernel import kernel  # noqa: E402
from vllm_mirage.megakernel.graph import LAYER, TYPE, Task, build_task_graph  # noqa: E402
from vllm_mirage.megakernel.kernel import LaunchConfig  # noqa: E402
from vllm_mirage.megakernel.state import DecodeBuffers  # noqa: E402

SHAPES = {
    "qwen3-0.6b": dict(hidden=1024, inter=3072, hq=16, hkv=8, d=128, layers=28, vocab=151936),
    "qwen3-1.7b": dict(hidden=2048, inter=6144, hq=16, hkv=8, d=128, layers=28, vocab=151936),
    "qwen3-8b": dict(hidden=4096, inter=12288, hq=32, hkv=8, d=128, layers=36, vocab=151936),
}


def copy_bandwidth() -> float:
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def step_bytes(cfg: dict, batch: int, context: int, lm_head: bool) -> int:
    h, i, d, L = cfg["hidden"], cfg["inter"], cfg["d"], cfg["layers"]
    per_layer = ((cfg["hq"] + 2 * cfg["hkv"]) * d * h + h * cfg["hq"] * d + 3 * i * h + 2 * h + 2 * d) * 2
    kv = 2 * L * batch * context * cfg["hkv"] * d * 2
    return L * per_layer + (cfg["vocab"] * h * 2 if lm_head else 0) + kv


def stage_profile(graph, trace: torch.Tensor) -> dict:
    """Per task kind, summed over layers (µs): the stage's span from its first task's end of wait to its
    last task's end, the mean task time after its wait, and the mean of each phase of a task."""
    t = trace.cpu().double() / 1e3
    tasks = graph.tasks.cpu()[graph.queue.long().cpu()]  # the trace is in queue order
    kinds_all = tasks[:, TYPE]
    phases = {}
    for kind in kinds_all.unique().tolist():
        r = t[kinds_all == kind]
        ph = {"wait": r[:, 1] - r[:, 0], "compute": r[:, 2] - r[:, 1], "release": r[:, 3] - r[:, 2]}
        if kind in (Task.QKV, Task.GU, Task.LM, Task.O, Task.DOWN):
            has = r[:, 7] > 0
            if kind in (Task.QKV, Task.GU, Task.LM):
                ph["rstd"] = r[has, 6] - r[has, 1]
            ph["loop"] = r[has, 7] - torch.where(r[has, 6] > 0, r[has, 6], r[has, 1])
            ph["epilogue"] = r[has, 2] - r[has, 7]
        phases[Task(kind).name] = {k: round(v.mean().item(), 2) for k, v in ph.items()}
    kinds, layers = kinds_all.tolist(), tasks[:, LAYER].tolist()
    spans = defaultdict(float)
    busy = defaultdict(list)
    stages = defaultdict(list)
    for i, (kind, layer) in enumerate(zip(kinds, layers)):
        stages[(layer, kind)].append(i)
        busy[Task(kind).name].append((t[i, 2] - t[i, 1]).item())
    for (layer, kind), ids in stages.items():
        spans[Task(kind).name] += (t[ids, 2].max() - t[ids, 1].min()).item()
    total = (t[:, 2].max() - t[:, 0].min()).item()
    return {"total_us": total,
            "span_us": dict(spans),
            "mean_task_us": {k: sum(v) / len(v) for k, v in busy.items()}, "phases_us": phases,
            "critical_us": critical_path(t, stages)}


def critical_path(t: torch.Tensor, stages: dict) -> dict:
    """Per task kind, summed over layers (µs), each stage measured from the moment the stage before it
    finished (its last task's end of compute, T): ``done``, when this stage's last task finished (these
    add up to the step); ``handoff``, the median end of wait of the tasks that were waiting at T (the
    release, its propagation and the poll); and for the stamps a kind has, when its last task reached
    them (GEMV: ``rms``, ``loop``, and GU in a ``fused_down`` graph ``down``; ATTN: ``qk``, ``attend``,
    ``arrive``)."""
    stamps = {Task.QKV: {"rms": 6, "loop": 7}, Task.GU: {"rms": 6, "loop": 7, "down": 5},
              Task.LM: {"rms": 6, "loop": 7}, Task.O: {"loop": 7}, Task.DOWN: {"loop": 7},
              Task.ATTN: {"qk": 6, "attend": 7, "arrive": 5}}
    out = defaultdict(lambda: defaultdict(float))
    previous_end = t[:, 0].min()
    for (layer, kind), ids in sorted(stages.items(), key=lambda kv: t[kv[1], 2].max().item()):
        r = t[ids]
        name = Task(kind).name
        waiting = (r[:, 0] < previous_end) & (r[:, 1] > previous_end)
        if waiting.any():
            out[name]["handoff"] += (r[waiting, 1] - previous_end).median().item()
        for stamp, col in stamps.get(Task(kind), {}).items():
            hit = r[:, col] > 0
            if hit.any():
                out[name][stamp] += (r[hit, col].max() - previous_end).item()
        end = r[:, 2].max()
        out[name]["done"] += (end - previous_end).item()
        previous_end = end
    return {k: {s: round(v, 1) for s, v in d.items()} for k, d in out.items()}


def setup_step(cfg: dict, weights, batch: int, context: int, lm_head: bool, kvb=None, **overrides):
    """(KV batch, graph, buffers) of one decode step at ``context`` cached tokens per request, one
    worker per SM. ``overrides`` replace fields of the default shape for a side-by-side timing (e.g.
    ``attn_splits=1``, or ``block_n_qkv=0``: the tiles before one-round QKV tiles); ``kvb`` reuses a
    KV batch made for the same batch and context."""
    if kvb is None:
        kvb = random_batch([context] * batch, layers=cfg["layers"], hkv=cfg["hkv"], d=cfg["d"], dtype=torch.bfloat16,
                           num_blocks=batch * (context // 16 + 1), layout="fa_packed", device="cuda")
    workers = torch.cuda.get_device_properties(0).multi_processor_count
    shape = replace(weights.shape(batch=batch, lm_head=lm_head).for_workers(workers), **overrides)
    graph = build_task_graph(shape, workers).to("cuda")
    buffers = DecodeBuffers(shape, torch.bfloat16, "cuda")
    buffers.load_input(torch.randn(batch, cfg["hidden"], device="cuda").to(torch.bfloat16))
    return kvb, graph, buffers


def bench_shape(name: str, cfg: dict, weights, batch: int, context: int, bandwidth: float, configs: list,
                lm_head: bool, shapes: list[dict], attn_splits: list[int]) -> list:
    """Every launch config on the default shape, then the first config on each requested shape variant
    (``shapes``: DecodeShape fields over the default, in order; {} is the default again)."""
    kvb, graph, buffers = setup_step(cfg, weights, batch, context, lm_head)
    rows = [time_config(name, cfg, weights, kvb, graph, buffers, config, bandwidth, lm_head, batch, context)
            for config in configs]
    variants = [{"attn_splits": s} for s in attn_splits if s != graph.shape.attn_splits] + shapes
    for overrides in variants:
        _, graph, buffers = setup_step(cfg, weights, batch, context, lm_head, kvb, **overrides)
        rows.append(time_config(name, cfg, weights, kvb, graph, buffers, configs[0], bandwidth, lm_head, batch,
                                context))
    return rows


def time_config(name, cfg, weights, kvb, graph, buffers, config, bandwidth, lm_head, batch, context) -> dict:
    shape = graph.shape
    config = config.for_shape(shape)  # record what ran, not the Nones
    program = kernel.encode_program(graph, weights)
    kvtab = kernel.kv_pointer_table(kvb)
    down_ptrs = kernel.down_pointer_table(weights)
    floor_ms = step_bytes(cfg, batch, context, lm_head) / bandwidth * 1e3
    run = lambda: kernel.decode_step(graph, weights, kvb, buffers, program, kvtab, config,  # noqa: E731
                                     down_ptrs=down_ptrs)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        run()
    ms = triton.testing.do_bench(g.replay, warmup=25, rep=300, return_mode="median")
    row = {"model": name, "batch": batch, "context": context, "lm_head": lm_head, "config": config.__dict__,
           "workers": graph.num_workers, "block_n": shape.block_n, "qkv_rows": shape.qkv_rows,
           "block_n_out": shape.block_n_out, "attn_splits": shape.attn_splits, "fused_down": shape.fused_down,
           "step_ms": ms, "floor_ms": floor_ms, "fraction_of_floor": floor_ms / ms}
    print(f"{name} b{batch} ctx{context} {'lm ' if lm_head else ''}{config} qkv_rows={shape.qkv_rows} "
          f"block_n_out={shape.block_n_out} "
          f"attn_splits={shape.attn_splits} fused_down={shape.fused_down}: {ms:.3f} ms/step, "
          f"floor {floor_ms:.3f} ms ({100 * floor_ms / ms:.0f}%)", flush=True)
    trace = torch.zeros(graph.tasks.shape[0], 8, dtype=torch.int64, device="cuda")
    kernel.decode_step(graph, weights, kvb, buffers, program, kvtab, config, trace=trace, down_ptrs=down_ptrs)
    torch.cuda.synchronize()
    profile = stage_profile(graph, trace)
    row["trace"] = profile
    print("   traced: total %.1f us; stage spans %s" % (
        profile["total_us"], {k: round(v, 1) for k, v in profile["span_us"].items()}), flush=True)
    print("   phases:", profile["phases_us"], flush=True)
    print("   critical path:", profile["critical_us"], flush=True)
    return row


def compile_report() -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of the step kernel."""
    out = []
    for cache in getattr(kernel._decode_step_kernel, "device_caches", {}).values():
        for compiled in cache[0].values():
            out.append({"n_regs": compiled.n_regs, "n_spills": compiled.n_spills,
                        "shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs="+", default=["qwen3-0.6b", "qwen3-8b"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--context", type=int, nargs="+", default=[128], help="cached tokens per request")
    ap.add_argument("--layers", type=int, help="decoder layers instead of the model's (the same kernel variants: "
                    "a 1-layer run in parallel processes fills Triton's cache before a timed run)")
    ap.add_argument("--lm-head", action="store_true", help="end with the lm_head (else the final norm, as in vLLM)")
    ap.add_argument("--configs", default='[{}, {"block_k": 128, "block_k_out": 256, "stages": 4}]',
                    help="JSON list of LaunchConfig fields, timed side by side (default: the shape's "
                         "defaults, and the 128/256-column chunks with 4 stages that they replaced)")
    ap.add_argument("--shapes", default="[]",
                    help='JSON list of DecodeShape fields over the default shape, each timed with the first '
                         'config, in order (e.g. [{"block_n_qkv": 0}, {}]: block_n-row QKV tiles, then the default)')
    ap.add_argument("--attn-splits", type=int, nargs="*", default=[],
                    help="also time the first config with these context splits per (request, kv head)")
    args = ap.parse_args()
    configs = [LaunchConfig(**c) for c in json.loads(args.configs)]
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for name in args.models:
        cfg = dict(SHAPES[name], **({"layers": args.layers} if args.layers else {}))
        weights = random_weights(**cfg, dtype=torch.bfloat16, device="cuda", max_positions=max(args.context) + 1)
        for b in args.batch_sizes:
            for context in args.context:
                rows += bench_shape(name, cfg, weights, b, context, bw, configs, args.lm_head, json.loads(args.shapes),
                                    args.attn_splits)
        del weights
        torch.cuda.empty_cache()
    report = compile_report()
    print("compiled variants:", report)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "command": " ".join(sys.argv), "copy_bandwidth_bytes_per_s": bw, "compiled": report, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

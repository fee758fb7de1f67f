"""``vllm-mirage bench``: stock vs Mirage speed, each side in its own fresh engine process."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
import tempfile
from pathlib import Path

from vllm_mirage.cli import stats
from vllm_mirage.cli.context import Context, defaults, parse_json_dict, prepare, runner_spec
from vllm_mirage.cli.errors import EXIT_OK, CliError
from vllm_mirage.cli.launch import SideRun, run_side
from vllm_mirage.cli.report import render_table, write_reports
from vllm_mirage.cli.status import assess_mirage


def run_bench(args) -> int:
    ctx = prepare(args, "bench")
    d = defaults(ctx.on_cuda)
    batch_sizes = args.batch_sizes or d["batch_sizes"]
    if any(b < 1 for b in batch_sizes):
        raise CliError("--batch-sizes must all be at least 1")
    warmup = d["num_warmup"] if args.num_warmup is None else args.num_warmup
    iterations = d["num_iterations"] if args.num_iterations is None else args.num_iterations
    if warmup < 0 or iterations < 1:
        raise CliError("--num-warmup must be >= 0 and --num-iterations >= 1")
    if ctx.max_tokens < 2:
        ctx.note("--max-tokens 1: there is no decode step to measure; decode figures are n/a")
    if max(batch_sizes) > len(ctx.prompts):
        ctx.note(
            f"batch size {max(batch_sizes)} is larger than the {len(ctx.prompts)} prompts: "
            "batches cycle through the prompts (timing is unaffected: prefix caching is off)"
        )
    if args.profile_gpu and not ctx.on_cuda:
        ctx.note("--profile-gpu: GPU time per step is n/a on CPU")
    ctx.engine_args.setdefault("enable_prefix_caching", False)

    baselines = [parse_json_dict(a, "--baseline-args") for a in (args.baseline_args or ["{}"])]
    mirage_args = parse_json_dict(args.mirage_args, "--mirage-args")
    out_dir = Path(args.output or f"vllm-mirage-bench-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = 1 + len(batch_sizes) * (warmup + iterations)
    common = dict(
        batch_sizes=batch_sizes, num_warmup=warmup, num_iterations=iterations,
        profile_gpu=bool(args.profile_gpu),
    )

    def side_run(side: str, label: str, extra: dict, profile_name: str) -> SideRun:
        spec = runner_spec(ctx, "bench", side, extra, profile_dir=str(out_dir / profile_name), **common)
        return SideRun(side, label, spec, steps)

    several = len(baselines) > 1
    runs = [
        side_run("stock", f"stock[{i}]" if several else "stock", extra, f"profile-stock{i}")
        for i, extra in enumerate(baselines)
    ]
    runs.append(side_run("mirage", "mirage", mirage_args, "profile-mirage"))
    with tempfile.TemporaryDirectory(prefix="vllm-mirage-") as work:
        results = [run_side(r, Path(work), out_dir, ctx.on_cuda, args.verbose) for r in runs]
    stock_results, mirage = results[:-1], results[-1]

    if mirage["truncated_prompts"]:
        ctx.note(f"{mirage['truncated_prompts']} prompt(s) were cut to fit --max-model-len")
    code, assessment = assess_mirage(mirage, ctx.mode)
    rows = stats.summarize(stock_results, mirage, ctx.max_tokens)
    noisy = [f"batch {r['batch_size']} {side}" for r in rows for side in ("stock", "mirage")
             if (r[side]["decode_step_s"] or 0) < 0]
    if noisy:
        # Reported as measured, not clamped: a negative step says the numbers are noise.
        ctx.note(f"negative decode step ({', '.join(noisy)}): the max_tokens=1 call took longer than the "
                 "max_tokens=N call; timing noise exceeds the decode time, so raise --max-tokens, "
                 "--num-warmup or --num-iterations")
    report = build_results(ctx, args, rows, stock_results, baselines, mirage, assessment, common)
    paths = write_reports(report, out_dir)
    print(render_table(rows))
    print(assessment)
    print(f"Wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
    if code != EXIT_OK:
        print(f"vllm-mirage: {assessment}", file=sys.stderr)
    return code


def build_results(ctx: Context, args, rows, stock_results, baselines, mirage, assessment, common) -> dict:
    sides = {r["label"]: _raw(r) for r in [*stock_results, mirage]}
    return {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "system": mirage["system"],
        "model": {
            "name": args.model or defaults(ctx.on_cuda)["model"],
            **ctx.model.to_spec(),
            "config": mirage["engine"].get("hf_config") or ctx.model.config,
        },
        "dtype": mirage["engine"]["dtype"],
        "prompts": {
            "file": ctx.prompts_file,
            "count": len(ctx.prompts),
            "tokens": mirage["prompt_tokens"],
            "truncated": mirage["truncated_prompts"],
        },
        "settings": {"max_tokens": ctx.max_tokens, **common, "engine_args": ctx.engine_args},
        "baselines": [{"label": r["label"], "extra_engine_args": b} for r, b in zip(stock_results, baselines)],
        "mirage_status": mirage["mirage_status"],
        "mirage_assessment": assessment,
        "notes": ctx.notes,
        "rows": rows,
        "sides": sides,
    }


def _raw(result: dict) -> dict:
    keep = ("side", "label", "system", "engine", "mirage_status", "timings", "log")
    return {k: result.get(k) for k in keep}

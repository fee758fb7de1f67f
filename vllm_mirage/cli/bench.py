"""``vllm-mirage bench``: stock vs Mirage speed, each side in its own fresh engine process."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from vllm_mirage.cli import stats
from vllm_mirage.cli.context import MULTI_TOKEN_MODES, Context, defaults, parse_json_dict, prepare, runner_spec
from vllm_mirage.cli.errors import EXIT_OK, CliError
from vllm_mirage.cli.interleave import run_interleaved
from vllm_mirage.cli.launch import SideRun, file_label, run_side
from vllm_mirage.cli.report import render_table, write_reports
from vllm_mirage.cli.runner import nvidia_smi
from vllm_mirage.cli.saved_runs import SavedRuns
from vllm_mirage.cli.status import assess_mirage


@dataclass
class MirageSide:
    """One Mirage side of a bench run (one per --mode, and per --tokens-per-step of a multi-token mode) and
    its figures against the stock runs."""

    mode: str
    tokens_per_step: int | None  # multi-token modes only
    label: str
    result: dict  # the runner's
    code: int  # exit code of its assessment
    assessment: str
    rows: list[dict]  # stats.summarize against the stock runs


def run_bench(args) -> int:
    ctx = prepare(args, "bench")
    d = defaults(ctx.on_cuda)
    batch_sizes = args.batch_sizes or d["batch_sizes"]
    if any(b < 1 for b in batch_sizes):
        raise CliError("--batch-sizes must all be at least 1")
    warmup = d["num_warmup"] if args.num_warmup is None else args.num_warmup
    iterations = d["num_iterations"] if args.num_iterations is None else args.num_iterations
    if warmup < 0 or iterations < 1 or args.starts < 1:
        raise CliError("--num-warmup must be >= 0, --num-iterations and --starts >= 1")
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

    variants = mirage_variants(ctx.modes, args.tokens_per_step)
    baselines = [parse_json_dict(a, "--baseline-args") for a in (args.baseline_args or ["{}"])]
    mirage_args = parse_json_dict(args.mirage_args, "--mirage-args")
    out_dir = Path(args.output or f"vllm-mirage-bench-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = 1 + len(batch_sizes) * (warmup + iterations)
    common = dict(
        batch_sizes=batch_sizes, num_warmup=warmup, num_iterations=iterations,
        profile_gpu=bool(args.profile_gpu),
    )

    several = len(baselines) > 1
    engines = len(baselines) + len(variants)
    if args.interleave and "gpu_memory_utilization" in ctx.engine_args:
        # Every side's engine holds the GPU at once: each gets its share of what one engine would have.
        ctx.engine_args["gpu_memory_utilization"] = round(ctx.engine_args["gpu_memory_utilization"] / engines, 3)

    def side_run(side: str, label: str, extra: dict, mirage_mode: str | None = None,
                 tokens_per_step: int | None = None) -> SideRun:
        spec = runner_spec(ctx, "bench", side, extra, mirage_mode=mirage_mode, tokens_per_step=tokens_per_step,
                           profile_dir=str(out_dir / f"profile-{file_label(label)}"), **common)
        if args.interleave:
            spec["interleave"] = True
        return SideRun(side, label, spec, steps)

    runs = [side_run("stock", f"stock[{i}]" if several else "stock", extra) for i, extra in enumerate(baselines)]
    labels = {v: side_label(*v, variants) for v in variants}
    runs += [side_run("mirage", labels[v], mirage_args, *v) for v in variants]
    # Several starts run the sides in turn (stock, Mirage, stock, Mirage...): a slow spell of the host lands
    # on both sides, and each side's medians pool every start's iterations.
    saved = SavedRuns(out_dir / "runs", gpu=nvidia_smi("name") if ctx.on_cuda else None)
    per_start = []
    with tempfile.TemporaryDirectory(prefix="vllm-mirage-") as work:
        for start in range(args.starts):
            this_start = [replace(r, start=start, spec=later_start_spec(r.spec) if start else r.spec) for r in runs]
            if args.interleave:
                # The sides of one start are timed together: reuse a start only if all of it was saved.
                results = [saved.load(run) for run in this_start] if args.resume else [None]
                if None in results:
                    saved.forget_reused(this_start)
                    order = launch_order(this_start, start)
                    launched = run_interleaved(order, Path(work), out_dir, ctx.on_cuda, args.verbose,
                                               batch_sizes, warmup, iterations)
                    by_label = {run.label: result for run, result in zip(order, launched)}
                    results = [by_label[run.label] for run in this_start]
                    for run, result in zip(this_start, results):
                        saved.save(run, result)
                per_start.append(results)
                continue
            per_start.append([])
            for run in this_start:
                result = saved.load(run) if args.resume else None
                if result is None:
                    result = run_side(run, Path(work), out_dir, ctx.on_cuda, args.verbose)
                    saved.save(run, result)
                per_start[-1].append(result)
    if saved.reused:
        ctx.note(f"--resume: {len(saved.reused)} engine run(s) reused from {saved.directory} "
                 f"({', '.join(saved.reused)}), measured by an earlier invocation of this command")
    results = [stats.merge_starts(list(side)) for side in zip(*per_start)]
    stock_results, mirage_results = results[: len(baselines)], results[len(baselines):]

    if mirage_results[0]["truncated_prompts"]:
        ctx.note(f"{mirage_results[0]['truncated_prompts']} prompt(s) were cut to fit --max-model-len")
    sides = []
    for (mode, tokens), result in zip(variants, mirage_results):
        code, assessment = assess_mirage(result, mode)
        rows = stats.summarize(stock_results, result, ctx.max_tokens)
        sides.append(MirageSide(mode, tokens, labels[mode, tokens], result, code, assessment, rows))
    noisy = [f"batch {r['batch_size']} {side}" for m in sides for r in m.rows for side in ("stock", "mirage")
             if (r[side]["decode_step_s"] or 0) < 0]
    if noisy:
        # Reported as measured, not clamped: a negative step says the numbers are noise.
        ctx.note(f"negative decode step ({', '.join(sorted(set(noisy)))}): the max_tokens=1 call took longer "
                 "than the max_tokens=N call; timing noise exceeds the decode time, so raise --max-tokens, "
                 "--num-warmup or --num-iterations")
    for m in sides:
        paced = [r for r in m.rows if stats.host_bound(r["mirage"])]
        if paced:
            steps = ", ".join(f"batch {r['batch_size']}: {1e3 * r['mirage']['decode_step_s']:.2f} ms for "
                              f"{1e3 * r['mirage']['gpu_step_s']:.2f} ms of GPU" for r in paced)
            ctx.note(f"{m.label} is host-bound ({steps} per decode step): vLLM's host loop sets its wall "
                     "time, so its speed-up there says little about the kernels; compare GPU time/step")
    report = build_results(ctx, args, stock_results, baselines, sides, common)
    paths = write_reports(report, out_dir)
    for m in sides:
        if len(sides) > 1:
            print(f"--mode {m.mode}:")
        print(render_table(m.rows, m.label))
        print(m.assessment)
    print(f"Wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
    failed = [m for m in sides if m.code != EXIT_OK]
    for m in failed:
        print(f"vllm-mirage: {m.assessment}", file=sys.stderr)
    return failed[0].code if failed else EXIT_OK


def mirage_variants(modes: list[str], tokens_per_step: list[int]) -> list[tuple[str, int | None]]:
    """(mode, tokens per step) of each Mirage side: one per mode, and one per tokens-per-step count of a
    multi-token mode (None for the others)."""
    counts = list(dict.fromkeys(tokens_per_step))
    if len(counts) > 1 and not set(modes) & set(MULTI_TOKEN_MODES):
        raise CliError(f"several --tokens-per-step need a multi-token --mode ({', '.join(MULTI_TOKEN_MODES)})")
    return [(mode, n) for mode in modes for n in (counts if mode in MULTI_TOKEN_MODES else [None])]


def side_label(mode: str, tokens_per_step: int | None, variants: list[tuple[str, int | None]]) -> str:
    if mode == "stock":
        return "control"
    if len(variants) == 1:
        return "mirage"
    if sum(m == mode for m, _ in variants) > 1:
        return f"mirage[{mode}, {tokens_per_step} tokens]"
    return f"mirage[{mode}]"


def launch_order(runs: list[SideRun], start: int) -> list[SideRun]:
    """The order in which one start of an interleaved bench brings its engines up: rotated by the start,
    so that over as many starts as sides each side's engine comes up first once. Engine position is not
    neutral: the first engine sizes its memory on an idle GPU, and two stock Qwen3-8B engines of one
    start paired 0.98x (0.97-0.99) at batch 8, the later-started behind (docs/design.md, "Limits and
    open leads")."""
    k = start % len(runs)
    return runs[k:] + runs[:k]


def later_start_spec(spec: dict) -> dict:
    """A second or later start of a side: GPU time per step is a property of the kernels and varies
    within a few percent between starts, while profiled passes cost seconds a batch size (the traces
    are written and read back), so only the first start profiles; every start is timed."""
    return {**spec, "profile_gpu": False}


def build_results(ctx: Context, args, stock_results, baselines, sides: list[MirageSide], common) -> dict:
    """The results dict of the run. ``rows``, ``mirage_status`` and ``mirage_assessment`` are the first
    --mode's (the whole report with one mode); with several, ``modes`` has each one's."""
    first = sides[0].result
    results = {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "system": first["system"],
        "model": {
            "name": args.model or defaults(ctx.on_cuda)["model"],
            **ctx.model.to_spec(),
            "config": first["engine"].get("hf_config") or ctx.model.config,
        },
        "dtype": first["engine"]["dtype"],
        "prompts": {
            "file": ctx.prompts_file,
            "count": len(ctx.prompts),
            "tokens": first["prompt_tokens"],
            "truncated": first["truncated_prompts"],
        },
        "settings": {"max_tokens": ctx.max_tokens, **common, "engine_args": ctx.engine_args,
                     "starts": args.starts, "gpu_profiled_starts": 1 if args.profile_gpu else 0,
                     "interleaved": bool(args.interleave)},
        "baselines": [{"label": r["label"], "extra_engine_args": b} for r, b in zip(stock_results, baselines)],
        "mirage_status": first["mirage_status"],
        "mirage_assessment": sides[0].assessment,
        "mirage_mode": sides[0].mode,
        "mirage_tokens_per_step": sides[0].tokens_per_step,
        "mirage_label": sides[0].label,
        "notes": ctx.notes,
        "rows": sides[0].rows,
        "sides": {r["label"]: _raw(r) for r in [*stock_results, *(m.result for m in sides)]},
    }
    if len(sides) > 1:
        results["modes"] = [{"mode": m.mode, "tokens_per_step": m.tokens_per_step, "label": m.label,
                             "mirage_status": m.result["mirage_status"], "mirage_assessment": m.assessment,
                             "rows": m.rows} for m in sides]
    return results


def _raw(result: dict) -> dict:
    keep = ("side", "label", "system", "engine", "mirage_status", "speculative", "timings", "starts", "log",
            "interleaved_with")
    return {k: result.get(k) for k in keep}

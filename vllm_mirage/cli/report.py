"""Benchmark reports: ``results.json`` (everything, raw timings included), ``report.md``, ``plot.png``.

All three are rendered from one results dict (see ``bench.py``), so a report can be regenerated
from a saved ``results.json`` with :func:`write_reports`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vllm_mirage.cli import stats

_COLUMNS = (
    "batch", "side", "latency mean (ms)", "p50 (ms)", "p90 (ms)", "TTFT (ms)",
    "decode step (ms)", "GPU time/step (ms)", "output tok/s", "speed-up",
)


# A list of JSON numbers (or nulls/booleans) that json.dumps(indent=...) spread over several lines.
_SCALAR_LIST = re.compile(r"\[\s*(?:-?[\d.eE+-]+|null|true|false)(?:,\s*(?:-?[\d.eE+-]+|null|true|false))*\s*\]")


def json_text(data) -> str:
    """Indented JSON with each list of numbers on one line: a check's token ids and timings stay
    readable and take about half the bytes. Only matches that span lines are joined, and JSON strings
    never contain a raw newline, so string values are untouched."""
    def one_line(match: re.Match) -> str:
        span = match.group(0)
        if "\n" not in span:
            return span
        return re.sub(r"\s+", " ", span).replace("[ ", "[").replace(" ]", "]")

    return _SCALAR_LIST.sub(one_line, json.dumps(data, indent=2, default=str)) + "\n"


def write_reports(results: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "report.md", "plot": out_dir / "plot.png"}
    paths["json"].write_text(json_text(results))
    paths["markdown"].write_text(render_markdown(results))
    write_plot(_mode_rows(results), paths["plot"], title=results["model"]["name"])
    return paths


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.2f}"


def _mode_rows(results: dict) -> list[tuple[str, str, list[dict]]]:
    """(label, assessment, rows) per Mirage side: one, or one per --mode of a several-mode run."""
    if "modes" in results:
        return [(m["label"], m["mirage_assessment"], m["rows"]) for m in results["modes"]]
    return [(results.get("mirage_label", "mirage"), results["mirage_assessment"], results["rows"])]


def render_table(rows: list[dict], mirage_label: str = "mirage") -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    for row in rows:
        for side in ("stock", "mirage"):
            f = row[side]
            label = row["stock_label"] if side == "stock" else mirage_label
            speedup = "" if side == "stock" else f"{row['speedup_tokens_per_s']:.2f}x"
            cells = (
                str(row["batch_size"]), label, _ms(f["latency_mean_s"]), _ms(f["latency_p50_s"]),
                _ms(f["latency_p90_s"]), _ms(f["ttft_s"]), _ms(f["decode_step_s"]), _ms(f["gpu_step_s"]),
                f"{f['output_tokens_per_s']:.1f}", speedup,
            )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(results: dict) -> str:
    system, model, settings = results["system"], results["model"], results["settings"]
    device = system.get("gpu") or f"CPU: {system.get('cpu')}"
    driver = f", driver {system['driver']}" if system.get("driver") else ""
    lines = [
        f"# vllm-mirage bench: {model['name']}",
        "",
        f"- Device: {device}{driver}",
        f"- Versions: vLLM {system.get('vllm')}, torch {system.get('torch')}, Triton {system.get('triton')}, "
        f"vllm-mirage {system.get('vllm_mirage')}",
        f"- Model: {model['name']} ({model['kind']}, load_format {model['load_format']}, "
        f"dtype {results.get('dtype')})",
        f"- Prompts: {results['prompts']['count']} from {results['prompts']['file']}; "
        f"max_tokens {settings['max_tokens']}, warm-up {settings['num_warmup']}, "
        f"iterations {settings['num_iterations']}",
        *(f"- {text}" for _, text, _ in _mode_rows(results)),
        "- Stock baselines: " + "; ".join(
            f"{b['label']} = {json.dumps(b['extra_engine_args'])}" for b in results["baselines"]
        ),
        f"- Command: `{results['command']}`",
        "",
    ]
    for label, _, rows in _mode_rows(results):
        if "modes" in results:
            lines += [f"### {label}", ""]
        lines.append(render_table(rows, label))
    lines += _paired_section(results)
    lines += _acceptance_section(results)
    lines += _starts_section(results)
    lines += [
        "## Method",
        "",
        stats.__doc__.split("\n\n", 1)[1].strip(),
        "",
        "Each side ran in its own fresh process (the engines of one command share a compile cache); "
        "prefix caching was off. "
        "\"stock\" is the fastest baseline at each batch size; speed-up is Mirage's output tokens/s "
        "over stock's. GPU time/step sums profiled kernel durations (torch profiler through vLLM's "
        "profiler hook) of a max_tokens=N call minus a max_tokens=1 call, over N-1; n/a without "
        "--profile-gpu or without CUDA.",
        "",
    ]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines)


def _paired_section(results: dict) -> list[str]:
    """Medians of per-iteration ratios, where the sides were timed in turn (--interleave)."""
    rows = [(label, r) for label, _, mode_rows in _mode_rows(results) for r in mode_rows if r.get("paired")]
    if not rows:
        return []
    lines = ["## Paired ratios", "",
             "The sides' engines ran at once and were timed in turn: the i-th iterations of stock and Mirage "
             "ran seconds apart. Medians over iterations of the ratio of each such pair; in brackets the "
             "interval that holds the median with the coverage given (order statistics, no assumption "
             "about the distribution): a bar such as 0.98x is met where the interval's low end reaches it.", "",
             "| batch | side | pairs | decode step speed-up | TTFT, Mirage / stock | coverage |",
             "|---|---|---|---|---|---|"]
    for label, r in sorted(rows, key=lambda lr: lr[1]["batch_size"]):
        p = r["paired"]
        step = "n/a" if p["decode_step_speedup"] is None else (
            f"{p['decode_step_speedup']:.2f}x{_interval(p.get('decode_step_interval'))}")
        ttft = f"{p['ttft_ratio']:.2f}{_interval(p.get('ttft_interval'))}"
        coverage = (p.get("ttft_interval") or {}).get("coverage")
        lines.append(f"| {r['batch_size']} | {label} | {p['pairs']} | {step} | {ttft} | "
                     f"{'n/a' if coverage is None else f'{coverage:.0%}'} |")
    return lines + [""]


def _acceptance_section(results: dict) -> list[str]:
    """Per batch size, the share of draft tokens the verify passes accepted in the timed pairs, where the
    Mirage side drafted (speculative decoding)."""
    rows = [(label, r) for label, _, mode_rows in _mode_rows(results) for r in mode_rows
            if (r["mirage"].get("speculative") or {}).get("acceptance_rate") is not None]
    if not rows:
        return []
    lines = ["## Drafts accepted", "",
             "vLLM's speculative-decoding counters, read before and after each timed pair (warm-ups and "
             "profiled passes left out).", "",
             "| batch | side | draft tokens | accepted | tokens per engine step |", "|---|---|---|---|---|"]
    for label, r in sorted(rows, key=lambda lr: lr[1]["batch_size"]):
        spec = r["mirage"]["speculative"]
        lines.append(f"| {r['batch_size']} | {label} | {spec['num_draft_tokens']} | {spec['acceptance_rate']:.1%} | "
                     f"{spec['tokens_per_step']:.2f} |")
    return lines + [""]


def _interval(interval: dict | None) -> str:
    return "" if not interval else f" ({interval['low']:.2f}-{interval['high']:.2f})"


def _starts_section(results: dict) -> list[str]:
    """Each side's medians start by start, where sides were started several times (--starts)."""
    sides = {label: stats.start_figures(raw, results["settings"]["max_tokens"])
             for label, raw in results["sides"].items() if raw.get("starts")}
    if not sides:
        return []
    lines = ["## Engine starts", "",
             "Medians of each engine start, in start order (the tables above pool every start's iterations).",
             "", "| batch | side | decode step (ms) | TTFT (ms) |", "|---|---|---|---|"]
    for bs in sorted(next(iter(sides.values()))[0]):
        for label, starts in sides.items():
            step = " / ".join(_ms(s[bs]["decode_step_s"]) for s in starts)
            ttft = " / ".join(_ms(s[bs]["ttft_s"]) for s in starts)
            lines.append(f"| {bs} | {label} | {step} | {ttft} |")
    return lines + [""]


def write_plot(sides: list[tuple[str, str, list[dict]]], path: Path, title: str = "") -> None:
    """Throughput of stock and each Mirage side, and each side's speed-up over stock, per batch size."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and never one in CI
    import matplotlib.pyplot as plt

    first = sides[0][2]
    sizes = [r["batch_size"] for r in first]
    fig, (tput, speed) = plt.subplots(1, 2, figsize=(10, 4))
    tput.plot(sizes, [r["stock"]["output_tokens_per_s"] for r in first], marker="o", label="stock")
    width = 0.8 / len(sides)
    for i, (label, _, rows) in enumerate(sides):
        tput.plot(sizes, [r["mirage"]["output_tokens_per_s"] for r in rows], marker="s", label=label)
        speed.bar([x + (i - (len(sides) - 1) / 2) * width for x in range(len(sizes))],
                  [r["speedup_tokens_per_s"] for r in rows], width=width, label=label)
    speed.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    speed.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    speed.set(xlabel="batch size", ylabel="Mirage / stock (tokens/s)", title="Speed-up")
    if len(sides) > 1:
        speed.legend()
    if len(sizes) > 1 and min(sizes) > 0:
        tput.set_xscale("log", base=2)
    tput.set_xticks(sizes, [str(s) for s in sizes])
    tput.set(xlabel="batch size", ylabel="output tokens/s", title="Throughput")
    tput.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

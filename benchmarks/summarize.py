"""Build BENCHMARKS.md from the result files under ``benchmarks/results/``.

    python benchmarks/summarize.py            # rewrite BENCHMARKS.md
    python benchmarks/summarize.py --check    # exit 1 if BENCHMARKS.md is not what the files give

A result is a folder ``benchmarks/results/<gpu>/<yyyy-mm-dd>-<what>/`` holding what one command wrote:
``results.json`` of ``vllm-mirage bench``, ``check.json`` of ``vllm-mirage check``, or the JSON of
``bench_megakernel.py`` / ``bench_ops.py``, each as written or gzip-compressed (``check.json.gz``: large
per-prompt files, so that the repository stays small). A ``command.txt`` beside them, if present, is the
command shown for the folder (e.g. the ``e2e_device.sh`` line that ran the bench); otherwise the command
the file records. The date is the file's own (``created``) where it has one, else the folder's.

Bench figures are recomputed from each file's raw timings with the package's own statistics (medians
over iterations), so files written by older versions of the bench read the same way as new ones.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vllm_mirage.cli import stats  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
_OUTPUT_ARG = re.compile(r"(--out|--output)[ =](\S+)")
OUTPUT = ROOT / "BENCHMARKS.md"


@dataclass
class Result:
    path: Path  # the JSON file, or its gzip
    data: dict

    @property
    def file_name(self) -> str:
        return _json_name(self.path)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def gpu_dir(self) -> str:
        return self.folder.relative_to(RESULTS).parts[0]

    @property
    def date(self) -> str:
        created = self.data.get("created")
        return created[:10] if created else self.folder.name[:10]

    @property
    def name(self) -> str:
        """The folder's <what>, and the file's stem where a folder holds several results."""
        what = self.folder.name[11:]
        stem = self.file_name.removesuffix(".json")
        return what if self.file_name in ("results.json", "check.json", "soak.json") else f"{what}/{stem}"

    @property
    def link(self) -> str:
        return f"[{self.name}]({_rel(self.path if '/' in self.name else self.folder)})"

    def _command_lines(self) -> list[str]:
        given = self.folder / "command.txt"
        return given.read_text().replace("\\\n", " ").splitlines() if given.is_file() else []

    def command_note(self) -> str:
        """The "#" lines of command.txt (what a plan file or a variable holds), after the command."""
        return "".join(f" {x.lstrip('# ').strip()}" for x in self._command_lines() if x.startswith("#"))

    def command(self) -> str:
        lines = self._command_lines()
        if lines:
            # One line in the page: shell line continuations and indentation fold away; "#" lines are notes.
            return " ".join(" ".join(x for x in lines if not x.startswith("#")).split())
        meta = self.data.get("meta", self.data)
        # Where the run wrote its files says nothing about the result; OUT is what a reader would pass.
        return _OUTPUT_ARG.sub(lambda m: f"{m[1]} OUT{'.json' if m[2].endswith('.json') else ''}",
                               meta.get("command", ""))


def _rel(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    return rel + "/" if path.is_dir() else rel


def _json_name(path: Path) -> str:
    return path.name.removesuffix(".gz")


def _read_json(path: Path):
    return json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())


def _kind(path: Path, data) -> str | None:
    if not isinstance(data, dict):
        return None
    name = _json_name(path)
    if name == "results.json" and "sides" in data:
        return "bench"
    if name == "check.json" or ("comparison" in data and "sides" in data):
        return "check"
    if name == "soak.json" and "summary" in data:
        return "soak"
    if "rows" in data and "copy_bandwidth_bytes_per_s" in data:
        return "megakernel"
    if "meta" in data and ("results" in data or "sweep" in data):
        return "ops"
    return None


def load_results() -> dict[str, list[Result]]:
    found: dict[str, list[Result]] = {"bench": [], "check": [], "soak": [], "megakernel": [], "ops": []}
    for path in sorted([*RESULTS.glob("*/*/*.json"), *RESULTS.glob("*/*/*.json.gz")]):
        data = _read_json(path)
        kind = _kind(path, data)
        if kind:
            found[kind].append(Result(path, data))
    for results in found.values():
        # Newest first; within a day, by folder and file name.
        results.sort(key=lambda r: (r.folder.name, r.file_name))
        results.sort(key=lambda r: r.date, reverse=True)
    return found


def _groups(results: list[Result], heading) -> list[tuple[str, list[Result]]]:
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(heading(r), []).append(r)
    return sorted(groups.items())


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1e3 * seconds:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "n/a"


def _grouped_tables(results: list[Result], heading, header: tuple[str, ...], rows, level: str = "###",
                    caption: str = "Commands:", extra=lambda r: "") -> list[str]:
    """Per heading (GPU, versions): a table of every result's rows, then the commands behind them."""
    lines = []
    for title, group in _groups(results, heading):
        lines += [f"{level} {title}", "", *_table(header, [row for r in group for row in rows(r)]), "", caption, ""]
        lines += _commands(group, extra) + [""]
    return lines


def _commands(results: list[Result], extra=lambda r: "") -> list[str]:
    return [f"- {r.link} ({r.date}){extra(r)}: `{r.command()}`{r.command_note()}" for r in results]


# --- vllm-mirage bench ---------------------------------------------------------------------------

def bench_rows(r: Result) -> list[tuple]:
    """One table row per (Mirage mode, batch size), figures recomputed from the raw timings."""
    d = r.data
    stock = [d["sides"][b["label"]] for b in d["baselines"]]
    modes = _modes(d)
    tp = d["settings"]["engine_args"].get("tensor_parallel_size", 1)
    rows = []
    for mode in modes:
        mirage = d["sides"][mode["label"]]
        tokens = mode.get("tokens_per_step")
        label = mode["mode"] + (f", {tokens} tokens a step" if tokens else "") + (f", TP={tp}" if tp > 1 else "")
        for row in stats.summarize(stock, mirage, d["settings"]["max_tokens"]):
            s, m = row["stock"], row["mirage"]
            paired = (row.get("paired") or {}).get("decode_step_speedup")
            interval = (row.get("paired") or {}).get("decode_step_interval")
            spread = f", {interval['low']:.2f}–{interval['high']:.2f}" if interval else ""
            paired_text = f" (paired {paired:.2f}×{spread})" if paired else ""
            rows.append((
                r.date, r.link, label, d["model"]["name"], row["batch_size"],
                f"{_ms(s['decode_step_s'])} / {_ms(m['decode_step_s'])}",
                _ratio(s["decode_step_s"], m["decode_step_s"]) + paired_text,
                f"{_ms(s['gpu_step_s'])} / {_ms(m['gpu_step_s'])}",
                _ratio(s["gpu_step_s"], m["gpu_step_s"]),
                f"{_ms(s['ttft_s'])} / {_ms(m['ttft_s'])}",
                d["settings"]["num_iterations"],
            ))
    return rows


def _modes(d: dict) -> list[dict]:
    """A bench file's Mirage sides: ``modes`` where the bench recorded it, else its one side's fields."""
    return d.get("modes") or [{"mode": _single_mode(d), "label": d.get("mirage_label", "mirage"),
                               "tokens_per_step": d.get("mirage_tokens_per_step"),
                               "mirage_status": d.get("mirage_status")}]


def _single_mode(d: dict) -> str:
    if d.get("mirage_mode"):  # recorded since bench --mode stock; "stock" is the control
        return d["mirage_mode"]
    status = d.get("mirage_status") or {}
    if status.get("draft") or d.get("mirage_assessment", "").startswith("Mirage applied: multi-token"):
        return "multi-token"
    return status.get("mode") or ("megakernel" if "megakernel" in d.get("mirage_assessment", "") else "fused")


BENCH_HEADER = (
    "date", "result", "Mirage", "model", "batch", "decode step ms, stock / Mirage", "wall speed-up",
    "GPU ms/step, stock / Mirage", "GPU speed-up", "TTFT ms, stock / Mirage", "iterations",
)


def bench_section(results: list[Result]) -> list[str]:
    lines = [
        "## Stock vLLM against vLLM + Mirage (`vllm-mirage bench`)",
        "",
        "Each side runs in its own fresh engine process. Decode step: (latency of N tokens − latency of 1 "
        "token) / (N − 1), the median over the timed iterations (wall clock). GPU ms/step: the same "
        "difference over kernel time summed from a torch-profiler trace; it leaves out the gaps between "
        "kernels, so where the GPU is the bottleneck the wall speed-up can exceed it. Where the wall step is "
        "well above the GPU step, vLLM's host loop sets the pace and the wall ratio says little about the "
        "kernels; \"paired\" is the median ratio of iterations timed in turn with every side's engine alive "
        "(`--interleave`), which cancels the host's slow spells, followed by the interval that holds that "
        "median with about 95% coverage (order statistics; with 5 pairs the range, 94%). "
        "TTFT: the median latency of one token. "
        "\"stock\" is the fastest of the stock settings run at each batch size. Models are the real Qwen3 "
        "configs with dummy weights, bf16, 128 new tokens.",
        "",
    ]
    return lines + _grouped_tables(results, _vllm_heading, BENCH_HEADER, bench_rows, caption="Commands and plots:",
                                   extra=lambda r: f", [plot]({_rel(r.folder / 'plot.png')})"
                                   if (r.folder / "plot.png").is_file() else "")


GRID_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def grid_section(results: list[Result]) -> list[str]:
    """The "never slower" grid: per GPU, model preset and mode, each batch size's paired ratios from the
    newest interleaved bench that ran the shipped plan (dummy weights, no VLLM_MIRAGE_PLAN)."""
    points: dict[tuple[str, str, str], dict[int, tuple[dict, Result, str]]] = {}
    for r in results:  # newest first: the first file to give a point keeps it
        d = r.data
        if d["model"]["name"].startswith("random:") or not d["settings"].get("interleaved"):
            continue
        stock = [d["sides"][b["label"]] for b in d["baselines"]]
        for mode in _modes(d):
            status = mode.get("mirage_status") or {}
            shipped = mode["mode"] in ("fused", "megakernel") and str(status.get("plan")).startswith("shipped")
            if not shipped and mode["mode"] != "stock":
                continue
            label = mode["mode"] if shipped else "stock (control)"
            key = (_system(r).get("gpu") or r.gpu_dir, d["model"]["name"], label)
            for row in stats.summarize(stock, d["sides"][mode["label"]], d["settings"]["max_tokens"]):
                if row.get("paired") and row["batch_size"] in GRID_BATCHES:
                    code = _code(status, row) if shipped else "control"
                    points.setdefault(key, {}).setdefault(row["batch_size"], (row["paired"], r, code))
    if not points:
        return []
    lines = [
        "## Never slower: the shipped plan, batch by batch",
        "",
        "Per model preset and `VLLM_USE_MIRAGE` mode, the paired decode-step speed-up over stock (95% "
        "interval) and, below it, the paired TTFT ratio (Mirage / stock), from the newest `--interleave` "
        "bench of the shipped plan at each batch size. ° marks points where the plan runs stock's layers on "
        "the Mirage side too (above its limits), so the ratio is how far two stock engines pair there. "
        "\"stock (control)\" is a second stock engine timed like a Mirage side (`bench --mode stock`): the "
        "same ratios between two engines running identical code, the yardstick for the rows beside it.",
        "",
    ]
    header = ("GPU", "model", "mode", *(f"batch {b}" for b in GRID_BATCHES), "files")
    rows = []
    for (gpu, model, mode), by_batch in sorted(points.items()):
        cells = []
        for b in GRID_BATCHES:
            if b not in by_batch:
                cells.append("—")
                continue
            paired, _, code = by_batch[b]
            step, interval, ttft = paired["decode_step_speedup"], paired["decode_step_interval"], paired["ttft_ratio"]
            spread = f" ({interval['low']:.2f}–{interval['high']:.2f})" if interval else ""
            mark = "°" if code == "stock" else ""
            cells.append(f"{step:.2f}{spread}{mark}<br>TTFT {ttft:.2f}")
        files = sorted({f"{r.link} ({_starts(r)})" for _, r, _ in by_batch.values()})
        rows.append((gpu, model, mode, *cells, ", ".join(files)))
    return lines + _table(header, rows) + [""]


def _starts(r: Result) -> str:
    starts = r.data["settings"].get("starts", 1)
    return f"{starts} start{'s' if starts > 1 else ''} a side"


def _code(status: dict, row: dict) -> str:
    """Which code the plan gives the Mirage side's decode steps at this batch size."""
    batch = row["batch_size"]
    if status.get("mode") == "megakernel" and batch <= (status.get("megakernel_max_batch") or 0):
        return "megakernel"
    return "fused" if batch <= (status.get("fused_max_tokens") or 0) else "stock"


def _vllm_heading(r: Result) -> str:
    system = _system(r)
    return f"{system.get('gpu') or system.get('cpu') or 'GPU'}, vLLM {system.get('vllm')} (`{r.gpu_dir}/`)"


def _system(r: Result) -> dict:
    if "system" in r.data:
        return r.data["system"]
    if "summary" in r.data:  # a serving soak: one vLLM per mode, the same in every mode
        first = next(iter(r.data["modes"].values()), {})
        return {"gpu": r.data.get("gpu"), "vllm": first.get("vllm")}
    return r.data["sides"]["stock"]["system"]


# --- vllm-mirage check ---------------------------------------------------------------------------

CHECK_HEADER = (
    "date", "result", "model", "Mirage", "dtype", "identical sequences", "near-ties", "real mismatches",
    "max logprob difference (nats)", "top-K logprob difference, mean / max (nats)",
    "control: stock against stock, mean / max (nats)",
)


def check_row(r: Result) -> tuple:
    c, sides = r.data["comparison"], r.data["sides"]
    engine = sides["mirage"]["engine"]
    model = Path(engine["args"]["model"]).name
    args = {side: sides[side]["engine"]["args"].get("tensor_parallel_size", 1) for side in ("stock", "mirage")}
    status = sides["mirage"].get("mirage_status") or {}
    mode = status.get("mode") or ("megakernel" if "megakernel" in r.data["mirage_assessment"] else "fused")
    if r.data["mirage_assessment"].startswith("Control run"):
        mode = "none: stock against stock"
    if args["stock"] > 1 or args["mirage"] > 1:
        mode += f", TP={args['mirage']} against stock TP={args['stock']}"
    control = (r.data.get("control") or {}).get("comparison")
    return (r.date, r.link, model, mode, c["dtype"], f"{c['exact_matches']}/{c['prompts']}", c["near_ties"],
            c["real_mismatches"], f"{c['max_logprob_diff']:.2g}", _top_k(c), _top_k(control) if control else "n/a")


def _top_k(comparison: dict) -> str:
    top = comparison.get("logprobs")
    return f"{top['mean_diff']:.2g} / {top['max_diff']:.2g} (top {top['top_k']})" if top else "n/a"


def check_section(results: list[Result]) -> list[str]:
    lines = [
        "## Same tokens? (`vllm-mirage check`)",
        "",
        "Greedy tokens of 145 prompts, stock against Mirage. A near-tie is a divergence where stock's top two "
        "tokens were within the tolerance; the logprob difference is over the tokens both sides chose.",
        "",
    ]
    return lines + _grouped_tables(results, _vllm_heading, CHECK_HEADER, lambda r: [check_row(r)])


# --- serving soak --------------------------------------------------------------------------------

SOAK_HEADER = (
    "date", "result", "mode", "requests", "errors", "output tok/s", "vs stock", "TTFT p50 (ms)", "TPOT p50 (ms)",
    "same text in both bursts", "same text as stock's server", "GPU memory growth (MiB)",
)


def soak_rows(r: Result) -> list[tuple]:
    summary = r.data["summary"]
    stock = summary.get("stock", {}).get("output_tokens_per_s")
    rows = []
    for mode, m in summary.items():
        bursts = len(r.data["modes"][mode]["bursts"])
        same = m.get("same_text_as_stock")
        rows.append((
            r.date, r.link, mode, f"{m['requests_per_burst']} × {bursts}", m["errors"],
            f"{m['output_tokens_per_s']:.0f}", _ratio(m["output_tokens_per_s"], stock),
            _ms(m["ttft_median_s"]), _ms(m["tpot_median_s"]),
            f"{m['same_text_across_bursts']}/{m['requests_per_burst']}",
            " and ".join(str(x) for x in same) if same else "n/a", f"{m['memory_growth_mib']:.0f}",
        ))
    return rows


def soak_section(results: list[Result]) -> list[str]:
    if not results:
        return []
    lines = [
        "## Serving soak (`benchmarks/serve_soak.py`)",
        "",
        "The real `vllm serve` per mode, the same concurrent streamed greedy requests twice (completions and "
        "chats of mixed lengths). Text equality counts requests; on random bf16 weights near-ties are common, "
        "so compare each mode with stock's own agreement between its two bursts.",
        "",
    ]
    return lines + _grouped_tables(results, _vllm_heading, SOAK_HEADER, soak_rows)


# --- kernels alone -------------------------------------------------------------------------------

MEGAKERNEL_HEADER = ("date", "result", "model", "batch", "context", "launch", "ms/step", "% of floor")


def _launch(row: dict) -> str:
    fields = dict(row["config"])
    for key in ("attn_splits", "fused_down"):
        if key in row:
            fields[key] = row[key]
    return " ".join(f"{k}={json.dumps(v)}" for k, v in fields.items())


def megakernel_rows(r: Result) -> list[tuple]:
    return [(r.date, r.link, row["model"], row["batch"], row["context"], _launch(row), f"{row['step_ms']:.3f}",
             f"{100 * row['fraction_of_floor']:.0f}%") for row in r.data["rows"]]


def _torch_heading(r: Result) -> str:
    meta = r.data.get("meta", r.data)
    return f"{meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']} (`{r.gpu_dir}/`)"


OPS_HEADER = ("model", "T", "op", "path", "fused µs", "unfused µs", "speed-up", "fused % of copy BW")
SWEEP_HEADER = ("model", "op", "T", "best launch", "best µs", "chunked GEMV µs", "norm + cuBLAS µs",
                "% of copy BW")


def ops_lines(r: Result) -> list[str]:
    d = r.data
    lines = [f"{r.link} ({r.date}): `{r.command()}`", ""]
    if d.get("results"):
        lines += _table(OPS_HEADER, [
            (x["model"], x["T"], x["op"], x.get("path", ""), f"{x['fused_us']:.2f}", f"{x['unfused_us']:.2f}",
             f"{x['speedup']:.2f}×", f"{x['fused_bw_pct']:.0f}%") for x in d["results"]
        ]) + [""]
    if d.get("sweep"):
        lines += _table(SWEEP_HEADER, [
            (x["model"], x["op"], x["T"], " ".join(f"{k}={v}" for k, v in x["best"].items() if k != "us"),
             f"{x['best_us']:.2f}", f"{x['chunked_gemv_us']:.2f}", f"{x['unfused_us']:.2f}",
             f"{x['best_bw_pct']:.0f}%") for x in d["sweep"]
        ]) + [""]
    return lines


def kernels_section(megakernel: list[Result], ops: list[Result]) -> list[str]:
    lines = [
        "## Kernels alone",
        "",
        "### The megakernel's decode step (`benchmarks/bench_megakernel.py`)",
        "",
        "Random bf16 weights of the real shapes, one step replayed from a CUDA graph, without the lm_head "
        "(vLLM runs it). The floor is the bytes the step must read over the copy bandwidth measured in the "
        "same run. Rows of one file ran side by side in one process; compare rows within a file.",
        "",
    ]
    lines += _grouped_tables(megakernel, _torch_heading, MEGAKERNEL_HEADER, megakernel_rows, level="####")
    lines += [
        "### Fused ops (`benchmarks/bench_ops.py`)",
        "",
        "Each op against the kernels stock vLLM launches for the same work, bf16, CUDA-graph replays over more "
        "weight copies than L2 holds. `path` is what the op runs at that shape (`_linear_paths.py`).",
        "",
    ]
    for heading, group in _groups(ops, _torch_heading):
        lines += [f"#### {heading}", ""]
        for r in group:
            lines += ops_lines(r)
    return lines


def render() -> str:
    found = load_results()
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/summarize.py` from the files under "
        "[benchmarks/results/](benchmarks/results/), newest first; do not edit by hand (a test checks it is "
        "current). What each tool measures and how to run it: [benchmarks/README.md](benchmarks/README.md).",
        "",
        *grid_section(found["bench"]),
        *bench_section(found["bench"]),
        *check_section(found["check"]),
        *soak_section(found["soak"]),
        *kernels_section(found["megakernel"], found["ops"]),
    ]
    while lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with BENCHMARKS.md instead of writing it")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT.name} is stale: run python benchmarks/summarize.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

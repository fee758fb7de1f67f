"""``vllm-mirage check``: do stock vLLM and vLLM with Mirage produce the same greedy tokens?

What counts as a real mismatch:

* float32: any token that differs. Fused kernels reorder float32 sums, which moves logits by ~1e-6;
  greedy tokens only flip on exact ties, so a flip is a bug until shown otherwise.
* bfloat16/float16: a divergence where the token Mirage picked scores, in the stock run, within
  ``--tolerance`` nats of the stock top-1 is a *near-tie*: reported, tolerated. A different (equally
  valid) summation order rounds 16-bit logits differently, enough to flip a tie. The default
  tolerance is one rounding step of a typical logit: float16 keeps 11 significant bits, so 0.05 nats
  is generous; bfloat16 keeps 8, so a logit between 8 and 16 moves in steps of 0.0625 and two
  tokens one step apart are a tie in all but name: its default is 0.1. Usually that token is the stock second choice, so the test is "top-1/top-2 gap
  <= tolerance"; the stock run returns its top candidates (twice ``--logprobs``, 10 by default) so
  ties between several tokens (common with dummy weights) are judged the same way. Anything else (a
  wide gap, or a token outside the stock candidates) is real. After a divergence the two continuations have different contexts, so only the
  prefix up to the first divergence is compared.

Tokens alone say little on random weights: greedy choices flip on rounding, and near-uniform logits
(dummy weights) hide a wrong attention. So the logprobs are compared too: at every step whose context
both sides share (up to and including the first divergence), the stock run's top-k tokens
(``--logprobs``) are looked up in the Mirage run's candidates, and the max and mean |difference| are
reported. Each side returns twice as many candidates as are compared, so a small reordering at the
edge of the top-k does not lose a token; a stock token still missing from Mirage's list is counted,
and enters the figures with the smallest difference its absence implies.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_mirage.cli.context import parse_json_dict, prepare, runner_spec
from vllm_mirage.cli.errors import EXIT_MISMATCH, EXIT_OK, CliError
from vllm_mirage.cli.launch import SideRun, run_side
from vllm_mirage.cli.report import json_text
from vllm_mirage.cli.status import assess_mirage

DEFAULT_TOLERANCE = {"float16": 0.05, "bfloat16": 0.1}  # nats; float32 is compared exactly
TOP_LOGPROBS = 5  # stock's top tokens compared per step (--logprobs)
CANDIDATES_PER_COMPARED = 2  # each side returns this many candidates per compared token


@dataclass
class PromptComparison:
    index: int
    tokens: int  # tokens compared (the shorter of the two outputs)
    first_divergence: int | None  # position of the first differing token, None if identical
    stock_token: int | None = None
    mirage_token: int | None = None
    stock_gap: float | None = None  # stock top-1 minus top-2 logprob at the divergence
    mirage_token_gap: float | None = None  # stock top-1 minus the stock logprob of Mirage's token
    near_tie: bool = False
    max_logprob_diff: float = 0.0  # over the matched prefix, on the chosen tokens
    # Stock's top-k tokens at each step of a shared context (the matched prefix and its divergence step):
    top_k_diffs: list[float] = field(default_factory=list)  # per step, the max |difference|
    top_k_sum: float = 0.0  # sum and count of |difference| over all (step, token) pairs, for the mean
    top_k_pairs: int = 0
    top_k_missing: int = 0  # stock top-k tokens absent from Mirage's candidates

    @property
    def real_mismatch(self) -> bool:
        return self.first_divergence is not None and not self.near_tie


def compare(stock: dict, mirage: dict, dtype: str, tolerance: float | None = None, top_k: int = TOP_LOGPROBS) -> dict:
    """Compare two runner results (token ids and top logprobs per prompt)."""
    exact_only = dtype == "float32"
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE["float16"])
    rows = [
        _compare_one(i, s_ids, m_ids, s_lps, m_lps, exact_only, tolerance, top_k)
        for i, (s_ids, m_ids, s_lps, m_lps) in enumerate(
            zip(stock["token_ids"], mirage["token_ids"], stock["logprobs"], mirage["logprobs"])
        )
    ]
    n = len(rows)
    matches = sum(r.first_divergence is None for r in rows)
    return {
        "dtype": dtype,
        "rule": "exact" if exact_only else f"near-ties within {tolerance} nats tolerated",
        "tolerance": None if exact_only else tolerance,
        "prompts": n,
        "exact_matches": matches,
        "exact_match_rate": matches / n if n else 1.0,
        "near_ties": sum(r.near_tie for r in rows),
        "real_mismatches": sum(r.real_mismatch for r in rows),
        "max_logprob_diff": max((r.max_logprob_diff for r in rows), default=0.0),
        "logprobs": _top_k_summary(rows, top_k),
        "per_prompt": [asdict(r) for r in rows],
    }


def _compare_one(index, s_ids, m_ids, s_lps, m_lps, exact_only, tolerance, top_k) -> PromptComparison:
    n = min(len(s_ids), len(m_ids))
    row = PromptComparison(index=index, tokens=n, first_divergence=None)
    diverged_at = next((t for t in range(n) if s_ids[t] != m_ids[t]), None)
    if diverged_at is None and len(s_ids) != len(m_ids):
        diverged_at = n  # one side stopped early: with ignore_eos that is itself a difference
    prefix = n if diverged_at is None else diverged_at
    for t in range(min(prefix, len(s_lps), len(m_lps))):
        s_lp, m_lp = _logprob_of(s_lps[t], s_ids[t]), _logprob_of(m_lps[t], m_ids[t])
        if s_lp is not None and m_lp is not None:
            row.max_logprob_diff = max(row.max_logprob_diff, abs(s_lp - m_lp))
    # The divergence step itself still had the same context on both sides.
    for t in range(min(prefix + 1, n, len(s_lps), len(m_lps))):
        _add_top_k_step(row, s_lps[t][:top_k], m_lps[t])
    if diverged_at is None:
        return row
    row.first_divergence = diverged_at
    if diverged_at < n:
        row.stock_token, row.mirage_token = s_ids[diverged_at], m_ids[diverged_at]
        ranked = s_lps[diverged_at] if diverged_at < len(s_lps) else []
        if len(ranked) >= 2:
            row.stock_gap = ranked[0][1] - ranked[1][1]
        mirage_in_stock = _logprob_of(ranked, row.mirage_token)
        if ranked and mirage_in_stock is not None:
            row.mirage_token_gap = ranked[0][1] - mirage_in_stock
            row.near_tie = not exact_only and row.mirage_token_gap <= tolerance
    return row


def _logprob_of(ranked: list, token: int) -> float | None:
    return next((lp for t, lp in ranked if t == token), None)


def _add_top_k_step(row: PromptComparison, stock_top: list, mirage_ranked: list) -> None:
    worst = 0.0
    for token, s_lp in stock_top:
        m_lp = _logprob_of(mirage_ranked, token)
        if m_lp is None:
            # Below all of Mirage's candidates: its logprob is at most the lowest one listed.
            row.top_k_missing += 1
            m_lp = min((lp for _, lp in mirage_ranked), default=s_lp)
            diff = max(0.0, s_lp - m_lp)
        else:
            diff = abs(s_lp - m_lp)
        worst = max(worst, diff)
        row.top_k_sum += diff
        row.top_k_pairs += 1
    row.top_k_diffs.append(worst)


def _top_k_summary(rows: list[PromptComparison], top_k: int) -> dict:
    """|logprob difference| on stock's top-k tokens over the shared-context steps of every prompt."""
    pairs = sum(r.top_k_pairs for r in rows)
    by_step = [
        max(r.top_k_diffs[t] for r in rows if t < len(r.top_k_diffs))
        for t in range(max((len(r.top_k_diffs) for r in rows), default=0))
    ]
    diverged = [r for r in rows if r.first_divergence is not None]
    first = min(diverged, key=lambda r: r.first_divergence, default=None)
    return {
        "top_k": top_k,
        "steps_compared": sum(len(r.top_k_diffs) for r in rows),
        "max_diff": max(by_step, default=0.0),
        "mean_diff": sum(r.top_k_sum for r in rows) / pairs if pairs else None,
        "max_diff_by_step": by_step,  # over prompts, per generated-token position
        "missing": sum(r.top_k_missing for r in rows),
        "pairs": pairs,
        # Greedy decoding takes the top token, so the first step where the top tokens differ is the first
        # divergence of the tokens.
        "first_top_token_difference": None if first is None else
        {"prompt": first.index, "step": first.first_divergence},
    }


def format_control(control: dict, engine_args: dict) -> str:
    """The control's line: stock against stock under other engine arguments (another batch composition),
    the size of the differences rounding alone makes on this model."""
    return (f"Control, stock against stock with {json.dumps(engine_args)}: identical sequences "
            f"{control['exact_matches']}/{control['prompts']}; {_format_top_k(control['logprobs'])}")


def format_verdict(comparison: dict, max_listed: int = 20, controlled: bool = False) -> str:
    c = comparison
    lines = [
        f"Prompts: {c['prompts']}, exact token match: {c['exact_matches']}/{c['prompts']} "
        f"({100 * c['exact_match_rate']:.1f}%), dtype {c['dtype']} ({c['rule']})",
        f"Max |logprob difference| on matched tokens: {c['max_logprob_diff']:.3g} nats",
        _format_top_k(c["logprobs"]),
    ]
    # Real mismatches first: they are what a truncated list must not hide.
    diverged = sorted(
        (r for r in c["per_prompt"] if r["first_divergence"] is not None), key=lambda r: r["near_tie"]
    )
    for r in diverged[:max_listed]:
        if r["stock_token"] is None:
            what = "one side produced fewer tokens"
        else:
            gap = "n/a" if r["stock_gap"] is None else f"{r['stock_gap']:.3g} nats"
            behind = (
                f"{r['mirage_token_gap']:.3g} nats behind stock top-1"
                if r["mirage_token_gap"] is not None else "not among stock's candidates"
            )
            what = (
                f"stock {r['stock_token']} vs mirage {r['mirage_token']} "
                f"(stock top-1/top-2 gap {gap}; mirage's token {behind})"
            )
        kind = "near-tie, tolerated" if r["near_tie"] else "REAL MISMATCH"
        lines.append(f"  prompt {r['index']}: first divergence at token {r['first_divergence']}: {what}: {kind}")
    if len(diverged) > max_listed:
        lines.append(f"  ... and {len(diverged) - max_listed} more (all are in check.json with --output DIR)")
    if c["real_mismatches"]:
        lines.append(f"Verdict: FAIL: {c['real_mismatches']} prompt(s) with a real token mismatch")
        if c["dtype"] in ("bfloat16", "float16") and not controlled:
            # Random or real bf16 weights: logits of ~16-32 resolve only 1/8 nat, and stock diverges from
            # itself when the batches change (docs/design.md, Numerics).
            lines.append("  Rounding or a fault? Stock against stock with other batches is the yardstick: "
                         "run again with --control '{\"max_num_seqs\": 8}' and compare the |logprob "
                         "difference| lines")
    elif c["near_ties"]:
        lines.append(f"Verdict: PASS ({c['near_ties']} near-tie divergence(s) tolerated)")
    else:
        lines.append("Verdict: PASS: identical tokens")
    return "\n".join(lines)


def _format_top_k(lp: dict) -> str:
    if not lp["pairs"]:
        return "Logprobs of stock's top tokens: none compared (no logprobs returned)"
    first = lp["first_top_token_difference"]
    where = "never" if first is None else f"step {first['step']} (prompt {first['prompt']})"
    missing = f", {lp['missing']} of them not among Mirage's candidates" if lp["missing"] else ""
    return (
        f"|Logprob difference| on stock's top-{lp['top_k']} tokens over {lp['steps_compared']} shared-context "
        f"steps: max {lp['max_diff']:.3g}, mean {lp['mean_diff']:.3g} nats ({lp['pairs']} pairs{missing}); "
        f"top token first differs: {where}"
    )



VLLM_MAX_LOGPROBS = 20  # vLLM's default max_logprobs: asking for more needs the engine argument


def run_check(args) -> int:
    ctx = prepare(args, "check")
    top_k = TOP_LOGPROBS if args.logprobs is None else args.logprobs
    if top_k < 1:
        raise CliError("--logprobs must be at least 1")
    candidates = CANDIDATES_PER_COMPARED * top_k
    if candidates > VLLM_MAX_LOGPROBS:
        ctx.engine_args.setdefault("max_logprobs", candidates)
    # Logs outlive the run (an error message points at them); spec files and caches do not.
    log_dir = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="vllm-mirage-check-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    side_args = {
        "stock": parse_json_dict(args.baseline_args, "--baseline-args"),
        "mirage": parse_json_dict(args.mirage_args, "--mirage-args"),
    }
    if args.control is not None and args.skip_baseline:
        raise CliError("--control compares with the stock side: drop --skip-baseline")
    # label -> (side, engine arguments), in start order: --control is stock again under other arguments.
    runs = {} if args.skip_baseline else {"stock": ("stock", side_args["stock"])}
    if args.control is not None:
        runs["control"] = ("stock", parse_json_dict(args.control, "--control"))
    runs["mirage"] = ("mirage", side_args["mirage"])
    with tempfile.TemporaryDirectory(prefix="vllm-mirage-") as work:
        results = {
            label: run_side(
                SideRun(side, label, runner_spec(ctx, "check", side, extra, logprobs=candidates), steps=2),
                Path(work), log_dir, ctx.on_cuda, args.verbose,
            )
            for label, (side, extra) in runs.items()
        }
    mirage = results["mirage"]
    if mirage["truncated_prompts"]:
        ctx.note(f"{mirage['truncated_prompts']} prompt(s) were cut to fit --max-model-len")
    code, assessment = assess_mirage(mirage, ctx.mode)
    engine = mirage["engine"]
    print(f"Model: {', '.join(engine['architectures'])} ({ctx.model.model}), dtype {engine['dtype']}")
    for side, extra in side_args.items():
        if extra:
            print(f"{side} side only: {json.dumps(extra)}")
    print(assessment)
    comparison = control = None
    if "control" in results:
        control = compare(results["stock"], results["control"], engine["dtype"], args.tolerance, top_k)
        print(format_control(control, runs["control"][1]))
    if "stock" in results:
        comparison = compare(results["stock"], mirage, engine["dtype"], args.tolerance, top_k)
        print(format_verdict(comparison, controlled=control is not None))
        if comparison["real_mismatches"] and code == EXIT_OK:
            code = EXIT_MISMATCH
    else:
        n = sum(len(t) for t in mirage["token_ids"])
        print(f"Mirage side only (--skip-baseline): {len(mirage['token_ids'])} prompts, {n} tokens generated")
    if args.output:
        out = log_dir / "check.json"
        sides_raw = {
            k: {x: v.get(x) for x in ("system", "engine", "mirage_status", "speculative", "token_ids", "log")}
            for k, v in results.items()
        }
        out.write_text(json_text(
            {"notes": ctx.notes, "mirage_assessment": assessment, "comparison": comparison,
             **({"control": {"engine_args": runs["control"][1], "comparison": control}} if control else {}),
             "sides": sides_raw}
        ))
        print(f"Wrote {out}")
    if code not in (EXIT_OK, EXIT_MISMATCH):
        print(f"vllm-mirage: {assessment}", file=sys.stderr)
    return code

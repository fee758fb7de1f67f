"""Per-batch figures from a runner's raw timings.

Each timed iteration is a pair of ``generate`` calls on the same batch (prefix caching off):
``t1`` with max_tokens=1 (prefill and first token: the time to first token) and ``tN`` with
max_tokens=N. Every request in a batch is submitted at once and, with ignore_eos, finishes at the
same step, so ``tN`` is each request's latency; the decode step is ``(tN - t1) / (N - 1)``.
Decode step, TTFT and throughput are medians over the iterations (one slow iteration on a busy host
does not move them); the mean decode step is kept beside them. vLLM's per-request
``RequestOutput.metrics`` differ between versions, hence this method.
"""

from __future__ import annotations

from math import comb
from statistics import fmean, median, quantiles


def p90(values: list[float]) -> float:
    """The 90th percentile, interpolated between the closest ranks (numpy's default)."""
    # quantiles() wants two points; a single timed iteration is its own percentile.
    return quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]


def batch_figures(timing: dict, max_tokens: int) -> dict:
    first, total, tokens = timing["first_token_s"], timing["total_s"], timing["output_tokens"]
    steps = max_tokens - 1
    decode = [(tn - t1) / steps for t1, tn in zip(first, total)] if steps else []
    fig = {
        "latency_mean_s": fmean(total),
        "latency_p50_s": median(total),
        "latency_p90_s": p90(total),
        "ttft_s": median(first),
        "decode_step_s": median(decode) if steps else None,
        "decode_step_mean_s": fmean(decode) if steps else None,
        "output_tokens_per_s": median([n / tn for n, tn in zip(tokens, total)]),
        "gpu_step_s": None,
        # The timed pairs' drafts (speculative decoding only): how many the verify passes accepted.
        "speculative": acceptance(timing["speculative"]) if timing.get("speculative") else None,
    }
    gpu = timing.get("gpu_kernel_s")
    if gpu and gpu.get("total") is not None:
        if steps and gpu.get("first_token") is not None:
            fig["gpu_step_s"] = (gpu["total"] - gpu["first_token"]) / steps
        else:
            fig["gpu_step_s"] = gpu["total"] / max_tokens
    return fig


def merge_starts(results: list[dict]) -> dict:
    """One side's results from several engine starts as one: per batch size, the timed iterations of
    every start pooled (so medians are over all of them), GPU time per call the median over the starts
    that profiled it (bench profiles the first only). The first start's other fields stand for the side;
    ``starts`` keeps each start's own timings."""
    if len(results) == 1:
        return results[0]
    merged = {**results[0], "timings": {}, "starts": [r["timings"] for r in results]}
    if all(r.get("speculative") for r in results):
        merged["speculative"] = acceptance({k: sum(r["speculative"][k] for r in results) for k in SPEC_COUNTS})
    for bs in results[0]["timings"]:
        per_start = [r["timings"][bs] for r in results]
        timing = {k: [v for t in per_start for v in t[k]] for k in ("first_token_s", "total_s", "output_tokens")}
        gpu = [g for g in (t.get("gpu_kernel_s") for t in per_start) if g and g.get("total") is not None]
        if gpu:
            timing["gpu_kernel_s"] = {k: median(g[k] for g in gpu) if all(g.get(k) is not None for g in gpu)
                                      else None for k in ("first_token", "total")}
        if all(t.get("speculative") for t in per_start):
            timing["speculative"] = {k: sum(t["speculative"][k] for t in per_start) for k in SPEC_COUNTS}
        merged["timings"][bs] = timing
    return merged


SPEC_COUNTS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


def acceptance(counts: dict) -> dict:
    """vLLM's speculative-decoding counts of a run, with the share of draft tokens the verify pass accepted
    and the tokens each engine step yielded on average (None where nothing was drafted)."""
    drafts, drafted, accepted = (counts[k] for k in SPEC_COUNTS)
    return {**counts, "acceptance_rate": accepted / drafted if drafted else None,
            "tokens_per_step": 1 + accepted / drafts if drafts else None}


def side_figures(result: dict, max_tokens: int) -> dict[int, dict]:
    return _figures(result["timings"], max_tokens)


def start_figures(result: dict, max_tokens: int) -> list[dict[int, dict]]:
    """Each engine start's own figures, batch size -> figures (one entry when the side started once):
    how far one start is from the next shows how much of a ratio is the engine rather than the code."""
    return [_figures(timings, max_tokens) for timings in result.get("starts") or [result["timings"]]]


def _figures(timings: dict, max_tokens: int) -> dict[int, dict]:
    return {int(bs): batch_figures(t, max_tokens) for bs, t in timings.items()}


def summarize(stock_results: list[dict], mirage: dict, max_tokens: int) -> list[dict]:
    """One row per batch size. With several baselines, "stock" is the fastest of them at that
    batch size (by output tokens/s): the speed-up is never measured against a weak baseline."""
    stock_figs = [(r, side_figures(r, max_tokens)) for r in stock_results]
    mirage_figs = side_figures(mirage, max_tokens)
    rows = []
    for bs in sorted(mirage_figs):
        stock_result, stock = max(
            ((r, figs[bs]) for r, figs in stock_figs), key=lambda rf: rf[1]["output_tokens_per_s"]
        )
        label = stock_result["label"]
        m = mirage_figs[bs]
        rows.append({
            "batch_size": bs,
            "stock_label": label,
            "stock": stock,
            "mirage": m,
            "speedup_tokens_per_s": m["output_tokens_per_s"] / stock["output_tokens_per_s"],
            "speedup_decode_step": (
                stock["decode_step_s"] / m["decode_step_s"]
                if stock["decode_step_s"] and m["decode_step_s"] else None
            ),
            "paired": paired_ratios(stock_result, mirage, bs, max_tokens),
        })
    return rows


def paired_ratios(stock: dict, mirage: dict, batch_size: int, max_tokens: int) -> dict | None:
    """Medians of per-iteration ratios, for sides timed in turn (``bench --interleave``): the i-th timed
    pairs of two such sides ran seconds apart, so a slow spell of the host is in both and cancels in
    their ratio, where it stays in a ratio of two medians. None for sides that were not interleaved."""
    if not (stock.get("interleaved_with") and mirage.get("interleaved_with")):
        return None
    s, m = stock["timings"][str(batch_size)], mirage["timings"][str(batch_size)]
    if len(s["total_s"]) != len(m["total_s"]) or not s["total_s"]:
        return None
    pairs = range(len(s["total_s"]))

    def decode(t: dict, i: int) -> float:  # the decode steps' share of a pair; N - 1 cancels in the ratio
        return t["total_s"][i] - t["first_token_s"][i]

    steps = [decode(s, i) / decode(m, i) for i in pairs] if max_tokens > 1 else None
    ttft = [m["first_token_s"][i] / s["first_token_s"][i] for i in pairs]
    return {
        "pairs": len(pairs),
        "decode_step_speedup": median(steps) if steps else None,
        "decode_step_interval": median_interval(steps) if steps else None,
        "ttft_ratio": median(ttft),
        "ttft_interval": median_interval(ttft),
    }


def median_interval(values: list[float], confidence: float = 0.95) -> dict:
    """A distribution-free interval for the median: the k-th smallest and k-th largest value, with the
    largest k whose coverage ``1 - 2 P(Binomial(n, 1/2) < k)`` still reaches ``confidence``. Paired ratios
    of a host-bound model are far from normal, hence order statistics. Below 6 values no pair of ranks
    reaches 95%: the interval is then the range, with the coverage it has."""
    ordered, n = sorted(values), len(values)
    k = 1
    while k < n // 2 and _median_coverage(n, k + 1) >= confidence:
        k += 1
    return {"low": ordered[k - 1], "high": ordered[n - k], "coverage": _median_coverage(n, k)}


def _median_coverage(n: int, k: int) -> float:
    """P(the k-th smallest of n values <= the median <= the k-th largest), any continuous distribution."""
    return 1 - 2 * sum(comb(n, i) for i in range(k)) / 2 ** n


# A side whose wall time per decode step exceeds its GPU time by this factor is paced by vLLM's host
# loop (scheduling, input preparation, sampling): a faster kernel cannot shorten its wall step. On
# Qwen3-0.6B an H100 host's step is 1.5-2.3 ms against 1.0-1.4 ms of GPU, and its speed varies by a
# quarter between runs (docs/design.md, "Where a small model's step goes").
HOST_BOUND_RATIO = 1.3


def host_bound(figures: dict) -> bool:
    step, gpu = figures.get("decode_step_s"), figures.get("gpu_step_s")
    return bool(step and gpu and step > HOST_BOUND_RATIO * gpu)

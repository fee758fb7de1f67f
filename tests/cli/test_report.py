import json

import pytest

from vllm_mirage.cli import stats
from vllm_mirage.cli.report import json_text, render_markdown, render_table, write_reports

N = 5  # max_tokens in the synthetic runs


def runner_result(label, seconds_per_step, ttft=0.010, iterations=3, gpu=None):
    """A runner result shaped like runner.py's, with timings that follow a known model."""
    timings = {}
    for bs in (1, 8):
        first = [ttft * (1 + 0.1 * k) for k in range(iterations)]
        total = [t1 + (N - 1) * seconds_per_step * (1 + bs / 100) for t1 in first]
        timings[str(bs)] = {"first_token_s": first, "total_s": total, "output_tokens": [bs * N] * iterations}
        if gpu is not None:
            timings[str(bs)]["gpu_kernel_s"] = {"first_token": 0.001, "total": 0.001 + (N - 1) * gpu}
    return {"label": label, "side": label.split("[")[0], "timings": timings, "mirage_status": None,
            "system": {"vllm": "0.32.0", "torch": "2.13", "triton": "3.9", "vllm_mirage": "0.1.0", "cpu": "Test CPU"},
            "engine": {"dtype": "bfloat16", "architectures": ["Qwen3ForCausalLM"]}}


def test_p90_and_batch_figures():
    assert stats.p90([3.0]) == 3.0
    assert stats.p90([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == pytest.approx(9.1)
    fig = stats.batch_figures({"first_token_s": [0.1, 0.2], "total_s": [0.5, 0.6], "output_tokens": [10, 10],
                               "gpu_kernel_s": {"first_token": 0.05, "total": 0.25}}, max_tokens=5)
    assert fig["decode_step_s"] == pytest.approx(0.1)  # (0.5 - 0.1) / 4 and (0.6 - 0.2) / 4
    assert fig["ttft_s"] == pytest.approx(0.15) and fig["latency_mean_s"] == pytest.approx(0.55)
    assert fig["output_tokens_per_s"] == pytest.approx((10 / 0.5 + 10 / 0.6) / 2)
    assert fig["gpu_step_s"] == pytest.approx(0.05)
    assert stats.batch_figures({"first_token_s": [0.1], "total_s": [0.1], "output_tokens": [1]}, 1)["decode_step_s"] is None


def test_decode_step_is_the_median_over_iterations():
    # One iteration on a busy host (0.3 s per step) moves the mean but not the reported step.
    fig = stats.batch_figures({"first_token_s": [0.1, 0.1, 0.1], "total_s": [0.5, 0.5, 1.3],
                               "output_tokens": [5, 5, 5]}, max_tokens=5)
    assert fig["decode_step_s"] == pytest.approx(0.1)
    assert fig["decode_step_mean_s"] == pytest.approx(0.5 / 3)
    assert fig["output_tokens_per_s"] == pytest.approx(10.0)


def test_host_bound_needs_both_times_and_a_wide_gap():
    assert stats.host_bound({"decode_step_s": 2.4e-3, "gpu_step_s": 1.0e-3})
    assert not stats.host_bound({"decode_step_s": 5.9e-3, "gpu_step_s": 5.85e-3})
    assert not stats.host_bound({"decode_step_s": 2.4e-3, "gpu_step_s": None})  # not profiled
    assert not stats.host_bound({"decode_step_s": None, "gpu_step_s": 1.0e-3})


def test_median_interval_takes_order_statistics_with_binomial_coverage():
    # 15 pairs: the 4th smallest and 4th largest hold the median 96.5% of the time (1 - 2 * 576 / 2**15).
    values = [1.0 + i / 100 for i in (7, 3, 11, 0, 14, 5, 9, 1, 12, 6, 2, 13, 8, 4, 10)]
    interval = stats.median_interval(values)
    assert (interval["low"], interval["high"]) == (1.03, 1.11)
    assert interval["coverage"] == pytest.approx(1 - 2 * (1 + 15 + 105 + 455) / 2**15)
    # The next pair inwards would cover less than 95%.
    assert 1 - 2 * (1 + 15 + 105 + 455 + 1365) / 2**15 < 0.95
    # Too few values for 95%: the range, with the coverage it has.
    assert stats.median_interval([2.0, 1.0, 3.0]) == {"low": 1.0, "high": 3.0, "coverage": 0.75}


def test_stronger_baseline_is_reported_as_stock():
    slow, fast = runner_result("stock[0]", 0.004), runner_result("stock[1]", 0.002)
    mirage = runner_result("mirage", 0.001)
    rows = stats.summarize([slow, fast], mirage, N)
    assert [r["batch_size"] for r in rows] == [1, 8]
    assert all(r["stock_label"] == "stock[1]" for r in rows)
    for r in rows:
        assert r["speedup_tokens_per_s"] == pytest.approx(r["mirage"]["output_tokens_per_s"] / r["stock"]["output_tokens_per_s"])
        assert r["speedup_decode_step"] == pytest.approx(2.0)
        assert r["speedup_tokens_per_s"] > 1


def synthetic_results(gpu):
    stock = runner_result("stock", 0.004, gpu=0.003 if gpu else None)
    mirage = runner_result("mirage", 0.002, gpu=0.0015 if gpu else None)
    rows = stats.summarize([stock], mirage, N)
    return {
        "command": "vllm-mirage bench --model qwen3-0.6b", "created": "2026-01-01T00:00:00",
        "system": {**mirage["system"], **({"gpu": "NVIDIA H100", "driver": "570.1"} if gpu else {})},
        "model": {"name": "qwen3-0.6b", "kind": "preset", "load_format": "dummy"},
        "dtype": "bfloat16",
        "prompts": {"file": "p.txt", "count": 3, "tokens": [4, 5, 6], "truncated": 0},
        "settings": {"max_tokens": N, "batch_sizes": [1, 8], "num_warmup": 1, "num_iterations": 3},
        "baselines": [{"label": "stock", "extra_engine_args": {}}],
        "mirage_status": {"mode": "fused", "fused_layers": 28, "reason": None},
        "mirage_assessment": "Mirage applied: fused, 28 fused decoder layers",
        "notes": ["batch size 8 is larger than the 3 prompts: batches cycle through the prompts"],
        "rows": rows,
        "sides": {"stock": stock, "mirage": mirage},
    }


@pytest.mark.parametrize("gpu", [False, True])
def test_reports_are_written(tmp_path, gpu):
    results = synthetic_results(gpu)
    paths = write_reports(results, tmp_path / "out")

    saved = json.loads(paths["json"].read_text())
    assert saved["sides"]["mirage"]["timings"]["8"]["total_s"] == results["sides"]["mirage"]["timings"]["8"]["total_s"]
    assert saved["rows"][0]["batch_size"] == 1

    md = paths["markdown"].read_text()
    table = [l for l in md.splitlines() if l.startswith("| ")]
    assert len(table) == 1 + 2 * 2  # header + (stock, mirage) per batch size
    mirage_b8 = next(l for l in table if l.startswith("| 8 | mirage"))
    assert mirage_b8.rstrip(" |").endswith(f"{results['rows'][1]['speedup_tokens_per_s']:.2f}x")
    assert ("NVIDIA H100, driver 570.1" in md) == gpu and ("CPU: Test CPU" in md) != gpu
    gpu_cell = mirage_b8.split("|")[8].strip()
    assert gpu_cell == ("1.50" if gpu else "n/a")
    assert "batches cycle through the prompts" in md and "Mirage applied" in md

    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_several_modes_get_a_table_each(tmp_path):
    results = synthetic_results(True)
    megakernel = runner_result("mirage[megakernel]", 0.0015, gpu=0.001)
    results["modes"] = [
        {"mode": "fused", "label": "mirage[fused]", "mirage_status": results["mirage_status"],
         "mirage_assessment": results["mirage_assessment"], "rows": results["rows"]},
        {"mode": "megakernel", "label": "mirage[megakernel]", "mirage_status": {"mode": "megakernel"},
         "mirage_assessment": "Mirage applied: megakernel, 28 fused decoder layers",
         "rows": stats.summarize([results["sides"]["stock"]], megakernel, N)},
    ]
    paths = write_reports(results, tmp_path)
    md = paths["markdown"].read_text()
    assert "### mirage[fused]" in md and "### mirage[megakernel]" in md and "Mirage applied: megakernel" in md
    stock_b1 = [l for l in md.splitlines() if l.startswith("| 1 | stock")]
    assert len(stock_b1) == 2 and stock_b1[0] == stock_b1[1]  # the same stock runs under both
    mk_b1 = next(l for l in md.splitlines() if l.startswith("| 1 | mirage[megakernel]"))
    assert mk_b1.split("|")[8].strip() == "1.00"  # its own GPU time per step, not the fused side's
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_a_single_control_side_is_labelled_as_such(tmp_path):
    results = {**synthetic_results(False), "mirage_label": "control",
               "mirage_assessment": "Control run (--mode stock): both sides are stock vLLM"}
    md = write_reports(results, tmp_path)["markdown"].read_text()
    assert "| 1 | control |" in md and "| 1 | mirage |" not in md
    assert "| 1 | mirage |" in render_markdown(synthetic_results(False))  # results without the field


def test_table_prints_without_reports():
    text = render_table(synthetic_results(False)["rows"])
    assert text.count("\n") == 6 and "speed-up" in text


def test_merge_starts_pools_iterations_and_takes_the_median_gpu_time():
    from vllm_mirage.cli import stats

    def start(first, total, gpu):
        return {"label": "stock", "timings": {"1": {"first_token_s": first, "total_s": total, "output_tokens": [8] * len(total),
                                                    "gpu_kernel_s": {"first_token": gpu[0], "total": gpu[1]}}}}

    starts = [start([0.1, 0.2], [1.0, 1.1], (0.01, 0.5)), start([0.3], [1.2], (0.03, 0.7)),
              start([0.4], [1.3], (0.02, 0.6))]
    merged = stats.merge_starts(starts)
    t = merged["timings"]["1"]
    assert t["first_token_s"] == [0.1, 0.2, 0.3, 0.4] and t["total_s"] == [1.0, 1.1, 1.2, 1.3]
    assert t["gpu_kernel_s"] == {"first_token": 0.02, "total": 0.6}
    assert merged["starts"] == [s["timings"] for s in starts] and merged["label"] == "stock"
    assert stats.merge_starts(starts[:1]) is starts[0]


def test_merge_starts_pools_the_speculative_counts():
    from vllm_mirage.cli import stats

    def start(drafts, accepted):
        counts = {"num_drafts": drafts, "num_draft_tokens": 3 * drafts, "num_accepted_tokens": accepted}
        return {"timings": {}, "speculative": stats.acceptance(counts)}

    merged = stats.merge_starts([start(10, 30), start(30, 30)])
    assert merged["speculative"] == {"num_drafts": 40, "num_draft_tokens": 120, "num_accepted_tokens": 60,
                                     "acceptance_rate": 0.5, "tokens_per_step": 2.5}
    assert "speculative" not in stats.merge_starts([{"timings": {}}, {"timings": {}}])


def test_acceptance_is_reported_per_batch_size(tmp_path):
    """The timed pairs' draft counts become each batch's acceptance, pooled over engine starts, and the
    report gets a line per batch; a side that drafted nothing (or did not draft) gets no section."""

    def drafting(at_1, at_8):
        result = runner_result("mirage", 0.002)
        for bs, (drafted, accepted) in (("1", at_1), ("8", at_8)):
            result["timings"][bs]["speculative"] = {"num_drafts": drafted // 3, "num_draft_tokens": drafted,
                                                    "num_accepted_tokens": accepted}
        return result

    mirage = stats.merge_starts([drafting((30, 27), (240, 180)), drafting((30, 30), (240, 120))])
    assert mirage["timings"]["8"]["speculative"] == {"num_drafts": 160, "num_draft_tokens": 480,
                                                     "num_accepted_tokens": 300}
    results = synthetic_results(False)
    results["rows"] = stats.summarize([results["sides"]["stock"]], mirage, N)
    b1, b8 = (r["mirage"]["speculative"] for r in results["rows"])
    assert b1["acceptance_rate"] == pytest.approx(57 / 60) and b1["tokens_per_step"] == pytest.approx(1 + 57 / 20)
    assert b8["acceptance_rate"] == pytest.approx(300 / 480)
    assert all(r["stock"]["speculative"] is None for r in results["rows"])
    md = write_reports(results, tmp_path)["markdown"].read_text()
    section = md.split("## Drafts accepted", 1)[1].split("##", 1)[0]
    assert "| 1 | mirage | 60 | 95.0% | 3.85 |" in section and "| 8 | mirage | 480 | 62.5% | 2.88 |" in section
    assert "## Drafts accepted" not in render_markdown(synthetic_results(False))
    # One start without counts (stat logging off): no pooled figure, rather than a part of one.
    partial = stats.merge_starts([drafting((30, 27), (240, 180)), runner_result("mirage", 0.002)])
    assert "speculative" not in partial["timings"]["1"]


def test_timed_pair_counts_only_its_own_drafts():
    from vllm_mirage.cli import runner

    class Output:
        def __init__(self, n):
            self.outputs = [type("Completion", (), {"token_ids": [0] * n})()]

    class FakeLLM:
        drafted = 0

        def generate(self, batch, params, use_tqdm):
            self.drafted += 3 * params  # "params" is the token count here
            return [Output(params) for _ in batch]

    llm = FakeLLM()
    counts = lambda: {"num_drafts": llm.drafted // 3, "num_draft_tokens": llm.drafted,  # noqa: E731
                      "num_accepted_tokens": 2 * llm.drafted // 3}
    timing = runner._new_timing()
    llm.drafted = 99  # start-up and warm-ups: not the pair's
    runner._timed_pair(llm, ["a", "b"], 1, 5, timing, counts)
    runner._timed_pair(llm, ["a", "b"], 1, 5, timing, counts)
    assert timing["speculative"] == {"num_drafts": 12, "num_draft_tokens": 36, "num_accepted_tokens": 24}
    assert timing["output_tokens"] == [10, 10]
    plain = runner._new_timing()
    runner._timed_pair(llm, ["a"], 1, 5, plain)
    assert "speculative" not in plain


def test_json_text_puts_lists_of_numbers_on_one_line_and_keeps_the_data():
    data = {"token_ids": [[1, 2, 3], [4]], "x": [0.5, -1e-05, None, True], "text": "a [1,\n 2] b", "rows": [{"a": 1}]}
    text = json_text(data)
    assert json.loads(text) == data
    assert '    [1, 2, 3],\n' in text and '"x": [0.5, -1e-05, null, true]' in text
    assert '"text": "a [1,\\n 2] b"' in text  # a string's characters are not touched


def test_each_start_is_shown_and_gpu_time_comes_from_the_profiled_start(tmp_path):
    """bench profiles only a side's first start: the merged GPU time is that start's, and report.md lists
    each start's own medians so that a reader sees how far one engine is from the next."""
    def start(step, gpu):
        timing = {"first_token_s": [0.01, 0.01], "total_s": [0.01 + step * (N - 1)] * 2, "output_tokens": [N, N]}
        if gpu:
            timing["gpu_kernel_s"] = {"first_token": 0.001, "total": 0.001 + gpu * (N - 1)}
        return {**runner_result("stock", step), "timings": {"1": timing}}

    merged = stats.merge_starts([start(0.002, 0.0015), start(0.003, None), start(0.004, None)])
    assert stats.side_figures(merged, N)[1]["gpu_step_s"] == pytest.approx(0.0015)
    results = synthetic_results(True)
    results["settings"]["batch_sizes"] = [1]
    results["sides"]["stock"] = merged
    md = write_reports(results, tmp_path) and (tmp_path / "report.md").read_text()
    assert "| 1 | stock | 2.00 / 3.00 / 4.00 | 10.00 / 10.00 / 10.00 |" in md
    assert "| 1 | mirage |" not in md.split("## Engine starts")[1]  # started once: nothing to list

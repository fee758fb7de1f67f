import pytest

from vllm_mirage.cli.check import compare, format_control, format_verdict
from vllm_mirage.cli.errors import EXIT_NOT_APPLICABLE, EXIT_NOT_APPLIED, EXIT_OK
from vllm_mirage.cli.status import assess_mirage


def side(token_ids, logprobs):
    return {"token_ids": token_ids, "logprobs": logprobs}


def steps(*ranked):
    """One prompt's logprobs: per step, [[token, logprob], ...] best first."""
    return [list(map(list, r)) for r in ranked]


STOCK = side([[5, 6, 7]], [steps([(5, -0.1), (9, -2.0)], [(6, -0.50), (8, -0.52)], [(7, -0.3), (1, -3.0)])])


def test_identical_outputs_pass_and_measure_logprob_drift():
    mirage = side([[5, 6, 7]], [steps([(5, -0.1001), (9, -2.0)], [(6, -0.5), (8, -0.52)], [(7, -0.35), (1, -3)])])
    c = compare(STOCK, mirage, "bfloat16")
    assert (c["exact_matches"], c["exact_match_rate"], c["real_mismatches"]) == (1, 1.0, 0)
    assert c["max_logprob_diff"] == pytest.approx(0.05)
    assert "Verdict: PASS: identical tokens" in format_verdict(c)


def near_tie_mirage(second_token=8):
    # Mirage takes the stock run's second choice at step 1, where stock's gap is 0.02 nats.
    return side([[5, second_token, 3]], [steps([(5, -0.2), (9, -2.0)], [(second_token, -0.5), (6, -0.51)], [(3, -1.0)])])


def test_near_tie_is_tolerated_in_16_bit():
    c = compare(STOCK, near_tie_mirage(), "bfloat16")
    row = c["per_prompt"][0]
    assert (row["first_divergence"], row["stock_token"], row["mirage_token"]) == (1, 6, 8)
    assert row["stock_gap"] == pytest.approx(0.02) and row["near_tie"]
    # Only the prefix before the divergence is compared: step 2 ran on different contexts.
    assert c["max_logprob_diff"] == pytest.approx(0.1)
    assert (c["exact_match_rate"], c["near_ties"], c["real_mismatches"]) == (0.0, 1, 0)
    text = format_verdict(c)
    assert "first divergence at token 1" in text and "near-tie, tolerated" in text and "Verdict: PASS" in text


def test_default_tolerance_follows_the_dtype():
    # A 0.0625-nat gap is one bfloat16 rounding step of a logit near 10, but a real gap in float16.
    stock = side([[5, 6]], [steps([(5, -0.1)], [(6, -1.0), (8, -1.0625)])])
    mirage = side([[5, 8]], [steps([(5, -0.1)], [(8, -1.0)])])
    assert compare(stock, mirage, "bfloat16")["near_ties"] == 1
    assert compare(stock, mirage, "float16")["real_mismatches"] == 1
    assert compare(stock, mirage, "float16", tolerance=0.07)["near_ties"] == 1


def test_real_mismatches_are_listed_first():
    ties = side([[8, 1]] * 30, [steps([(8, -0.5)], [(1, -1)])] * 30)
    stock = side([[6, 1]] * 30 + [[6, 1]], [steps([(6, -0.5), (8, -0.52)], [(1, -1)])] * 30 + [steps([(6, -0.1), (8, -3.0)], [(1, -1)])])
    mirage = side(ties["token_ids"] + [[8, 1]], ties["logprobs"] + [steps([(8, -0.1)], [(1, -1)])])
    c = compare(stock, mirage, "bfloat16")
    assert (c["near_ties"], c["real_mismatches"]) == (30, 1)
    assert "prompt 30: first divergence" in format_verdict(c, max_listed=5)


def test_same_divergence_is_real_below_the_tolerance_or_in_float32():
    assert compare(STOCK, near_tie_mirage(), "bfloat16", tolerance=0.01)["real_mismatches"] == 1
    c = compare(STOCK, near_tie_mirage(), "float32")
    assert c["real_mismatches"] == 1 and c["rule"] == "exact"
    assert "REAL MISMATCH" in format_verdict(c) and "Verdict: FAIL" in format_verdict(c)
    # A 16-bit failure points at the stock-against-stock control; a float32 one is a fault as it stands.
    assert "yardstick" not in format_verdict(c)
    bf16 = compare(STOCK, near_tie_mirage(), "bfloat16", tolerance=0.01)
    assert "--control" in format_verdict(bf16) and "--control" not in format_verdict(bf16, controlled=True)


def test_control_line_reports_stock_against_stock():
    line = format_control(compare(STOCK, STOCK, "bfloat16"), {"max_num_seqs": 8})
    assert line.startswith('Control, stock against stock with {"max_num_seqs": 8}: identical sequences 1/1;')
    assert "|Logprob difference|" in line and "max 0, mean 0 nats" in line


def test_token_outside_stock_candidates_is_real_even_when_the_top2_gap_is_small():
    c = compare(STOCK, near_tie_mirage(second_token=42), "float16")
    row = c["per_prompt"][0]
    assert c["real_mismatches"] == 1 and not row["near_tie"] and row["mirage_token_gap"] is None
    assert "not among stock's candidates" in format_verdict(c)


def test_three_way_tie_is_a_near_tie_and_a_distant_third_is_not():
    stock = side([[5, 6]], [steps([(5, -0.1)], [(6, -1.10), (8, -1.11), (9, -1.12), (3, -1.9)])])
    tie = side([[5, 9]], [steps([(5, -0.1)], [(9, -1.0)])])
    row = compare(stock, tie, "bfloat16")["per_prompt"][0]
    assert row["near_tie"] and row["stock_gap"] == pytest.approx(0.01) and row["mirage_token_gap"] == pytest.approx(0.02)
    far = side([[5, 3]], [steps([(5, -0.1)], [(3, -1.0)])])
    assert compare(stock, far, "bfloat16")["real_mismatches"] == 1


def test_shorter_output_is_a_divergence():
    mirage = side([[5, 6]], [steps([(5, -0.1)], [(6, -0.5)])])
    row = compare(STOCK, mirage, "bfloat16")["per_prompt"][0]
    assert row["first_divergence"] == 2 and row["stock_token"] is None and not row["near_tie"]


def test_top_k_logprobs_of_identical_tokens():
    # Mirage returns more candidates than are compared; only stock's top-2 count at each step.
    stock = side([[5, 6]], [steps([(5, -0.1), (9, -2.0), (4, -3.0)], [(6, -0.5), (8, -0.7), (4, -5.0)])])
    mirage = side([[5, 6]], [steps([(5, -0.2), (9, -2.3), (4, -9.0)], [(6, -0.5), (8, -0.6), (4, -5.0)])])
    lp = compare(stock, mirage, "bfloat16", top_k=2)["logprobs"]
    assert (lp["top_k"], lp["steps_compared"], lp["pairs"], lp["missing"]) == (2, 2, 4, 0)
    assert lp["max_diff_by_step"] == pytest.approx([0.3, 0.1])  # step 0's third token (6 nats off) is not compared
    assert lp["max_diff"] == pytest.approx(0.3) and lp["mean_diff"] == pytest.approx((0.1 + 0.3 + 0 + 0.1) / 4)
    assert lp["first_top_token_difference"] is None
    assert ("|Logprob difference| on stock's top-2 tokens over 2 shared-context steps: max 0.3, mean 0.125 nats "
            "(4 pairs); top token first differs: never") in format_verdict(compare(stock, mirage, "bfloat16", top_k=2))


def test_top_k_logprobs_stop_after_the_first_divergence():
    # Prompt 0 diverges at step 1, prompt 1 at step 2: steps up to the divergence share their context.
    stock = side([[5, 6, 7], [5, 6, 7]], [steps([(5, -0.1)], [(6, -0.50)], [(7, -0.3)])] * 2)
    mirage = side(
        [[5, 8, 7], [5, 6, 9]],
        [steps([(5, -0.1)], [(8, -0.45), (6, -0.52)], [(7, -9.0)]), steps([(5, -0.1)], [(6, -0.5)], [(9, -0.2), (7, -0.4)])],
    )
    c = compare(stock, mirage, "bfloat16", top_k=1)
    lp = c["logprobs"]
    first, second = (r["top_k_diffs"] for r in c["per_prompt"])
    assert first == pytest.approx([0.0, 0.02]) and second == pytest.approx([0.0, 0.0, 0.1])
    assert lp["max_diff_by_step"] == pytest.approx([0.0, 0.02, 0.1]) and lp["steps_compared"] == 5
    assert lp["first_top_token_difference"] == {"prompt": 0, "step": 1}
    assert "top token first differs: step 1 (prompt 0)" in format_verdict(c)


def test_stock_top_token_missing_from_mirage_counts_with_its_smallest_difference():
    stock = side([[5]], [steps([(5, -0.1), (9, -1.0), (3, -9.0)])])
    mirage = side([[5]], [steps([(5, -0.1), (4, -2.5)])])  # 9 and 3 are below -2.5 for Mirage
    lp = compare(stock, mirage, "bfloat16", top_k=3)["logprobs"]
    assert (lp["missing"], lp["pairs"]) == (2, 3)
    assert lp["max_diff"] == pytest.approx(1.5) and lp["mean_diff"] == pytest.approx(1.5 / 3)
    assert "2 of them not among Mirage's candidates" in format_verdict(compare(stock, mirage, "bfloat16", top_k=3))


def result(status, archs=("Qwen3ForCausalLM",), model_type="qwen3"):
    return {"mirage_status": status, "engine": {"architectures": list(archs), "model_type": model_type}}


def test_assess_mirage():
    code, msg = assess_mirage(result({"mode": "fused", "fused_layers": 28, "reason": None}))
    assert code == EXIT_OK and "28 fused decoder layers" in msg
    code, msg = assess_mirage(result(None, ["LlamaForCausalLM"], "llama"))
    assert code == EXIT_NOT_APPLICABLE and msg.startswith("Mirage did not apply: ") and "LlamaForCausalLM" in msg
    code, msg = assess_mirage(result({"mode": "off", "fused_layers": 0, "reason": "dtype float16 is not supported"}))
    assert code == EXIT_NOT_APPLIED and msg.endswith("dtype float16 is not supported")
    code, msg = assess_mirage(result(None))
    assert code == EXIT_NOT_APPLIED and "plugin" in msg
    mega = {"mode": "megakernel", "fused_layers": 2, "reason": None, "megakernel_steps": 11}
    code, msg = assess_mirage(result(mega), "megakernel")
    assert code == EXIT_OK and "11 decode steps through the megakernel" in msg
    unused = {**mega, "megakernel_steps": 0, "megakernel_declined": [f"decode batch of {n} > 16" for n in (17, 18, 19, 20)]}
    code, msg = assess_mirage(result(unused), "megakernel")
    assert code == EXIT_NOT_APPLIED and msg.endswith(
        "0 decode steps through the megakernel task graph: the megakernel ran no decode step "
        "(decode batch of 17 > 16; decode batch of 18 > 16; decode batch of 19 > 16; and 1 more)")
    # --mode stock: a control, whose side must have run stock's code.
    assert assess_mirage(result({"mode": "off", "fused_layers": 0, "reason": None}), "stock") == (
        EXIT_OK, "Control run (--mode stock): both sides are stock vLLM")
    code, msg = assess_mirage(result({"mode": "fused", "fused_layers": 28, "reason": None}), "stock")
    assert code == EXIT_NOT_APPLIED and msg.endswith("but that side ran Mirage (mode fused)")
    refused = {"mode": "fused", "fused_layers": 28, "reason": None, "megakernel_reason": "not validated on a GPU"}
    code, msg = assess_mirage(result(refused), "megakernel")
    assert code == EXIT_NOT_APPLIED and msg.endswith("requested and is off: not validated on a GPU")


def test_assess_multi_token():
    target = {"mode": "fused", "fused_layers": 2, "reason": None, "role": "target"}
    code, msg = assess_mirage(result(target), "multi-token")
    assert code == EXIT_NOT_APPLIED and "no Mirage draft model was built" in msg
    draft = {"mode": "megakernel", "fused_layers": 2, "role": "draft", "megakernel_steps": 24}
    r = {**result({**target, "draft": draft}), "speculative": {"acceptance_rate": 0.75, "tokens_per_step": 3.25}}
    code, msg = assess_mirage(r, "multi-token")
    assert code == EXIT_OK and msg == ("Mirage applied: multi-token, draft model megakernel, 24 draft steps through "
                                       "the megakernel task graph, 75.0% of draft tokens accepted "
                                       "(3.25 tokens per engine step)")
    for reads, says in ((True, "exact (the target's KV cache"), (False, "with its own KV cache (EAGLE's shift")):
        eagle = {**draft, "draft_reads_target_cache": reads}
        code, msg = assess_mirage(result({**target, "draft": eagle}), "multi-token-eagle")
        assert code == EXIT_OK and says in msg, msg
    idle = {**draft, "megakernel_steps": 0, "megakernel_declined": ["decode batch of 32 > 16"]}
    code, msg = assess_mirage(result({**target, "draft": idle}), "multi-token")
    assert code == EXIT_NOT_APPLIED and msg.endswith("drafted no step (decode batch of 32 > 16)")
    off = {"mode": "fused", "fused_layers": 2, "role": "draft", "megakernel_reason": "the plan runs it at no batch size"}
    code, msg = assess_mirage(result({**target, "draft": off}), "multi-token")
    assert code == EXIT_NOT_APPLIED and msg.endswith("(the plan runs it at no batch size)")


def test_unreadable_status_is_not_reported_as_applied():
    r = {**result(None), "mirage_status_error": "RuntimeError: cannot pickle"}
    code, msg = assess_mirage(r)
    assert code == EXIT_NOT_APPLIED and "could not read mirage_status" in msg and "cannot pickle" in msg


def test_acceptance_counts_the_run_only():
    from vllm_mirage.cli.runner import _acceptance

    before = {"num_drafts": 10, "num_draft_tokens": 30, "num_accepted_tokens": 30}
    after = {"num_drafts": 50, "num_draft_tokens": 150, "num_accepted_tokens": 120}
    run = _acceptance(before, after)
    assert (run["num_drafts"], run["num_draft_tokens"], run["num_accepted_tokens"]) == (40, 120, 90)
    assert run["acceptance_rate"] == 0.75 and run["tokens_per_step"] == 1 + 90 / 40
    assert _acceptance(before, before)["acceptance_rate"] is None

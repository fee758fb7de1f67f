"""DecodePlan: parsing and validation, the token lookup, and the arithmetic that turns timings into paths."""

import json

import pytest

from vllm_mirage.ops import _linear_paths
from vllm_mirage.tuning.plan import (
    CHUNKED, KINDS, ROW, TOKENS, UNFUSED, DecodePlan, best_paths, fused_max_tokens, reference_plan,
)


def _plan_dict(**overrides):
    linear = {kind: {str(t): UNFUSED for t in TOKENS} for kind in KINDS}
    linear["norm"]["1"] = ROW
    linear["norm_silu"]["4"] = CHUNKED
    return {"linear": linear, "fused_max_tokens": 4, "megakernel_max_batch": 8, **overrides}


def test_round_trip_and_lookup():
    plan = DecodePlan.from_dict(_plan_dict(), source="test")
    assert DecodePlan.from_dict(json.loads(json.dumps(plan.to_dict())), source="x").linear == plan.linear
    assert plan.linear_path("norm", 1) == ROW
    assert plan.linear_path("norm_silu", 3) == CHUNKED  # 3 tokens take what was measured at 4
    assert plan.linear_path("norm_silu", 5) == UNFUSED
    assert plan.linear_path("norm", 17) == UNFUSED  # past the measured counts: stock's work
    assert plan.megakernel_launch == {} and "megakernel_launch" not in plan.to_dict()  # the kernel's defaults


def test_launch_settings_round_trip():
    plan = DecodePlan.from_dict(_plan_dict(megakernel_launch={"block_k_out": 512, "thread_polls": False}), "test")
    again = DecodePlan.from_dict(json.loads(json.dumps(plan.to_dict())), source="x")
    assert again.megakernel_launch == plan.megakernel_launch == {"block_k_out": 512, "thread_polls": False}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("linear"), "'linear'"),
    (lambda d: d["linear"].pop("silu"), "'linear'"),
    (lambda d: d["linear"]["norm"].pop("16"), "each of"),
    (lambda d: d["linear"]["norm"].update({"2": "cublas"}), "unknown paths"),
    (lambda d: d.update(fused_max_tokens=-1), "fused_max_tokens"),
    (lambda d: d.update(megakernel_max_batch=True), "megakernel_max_batch"),
    (lambda d: d.update(megakernel_max_batch="16"), "megakernel_max_batch"),
    (lambda d: d.update(megakernel_launch={"block_k_outt": 512}), "LaunchConfig fields"),
    (lambda d: d.update(megakernel_launch=[512]), "LaunchConfig fields"),
    (lambda d: d.update(megakernel_launch={"block_k_out": "512"}), "megakernel_launch.block_k_out"),
    (lambda d: d.update(megakernel_launch={"stages": -1}), "megakernel_launch.stages"),
])
def test_malformed_plans_are_rejected(change, message):
    data = _plan_dict()
    change(data)
    with pytest.raises(ValueError, match=message):
        DecodePlan.from_dict(data, source="test")


def test_best_paths_needs_a_margin_over_stock_work():
    timings = {"norm": {1: {ROW: 9.0, CHUNKED: 9.8, UNFUSED: 10.0}, 2: {ROW: 9.8, CHUNKED: 9.9, UNFUSED: 10.0}},
               "norm_silu": {1: {CHUNKED: float("inf"), UNFUSED: 10.0}}}
    chosen = best_paths(timings, margin=0.03)
    assert chosen["norm"] == {1: ROW, 2: UNFUSED}  # 2% faster is within noise: stock's work runs
    assert chosen["norm_silu"] == {1: UNFUSED}  # a failed path is never chosen


def test_fused_layers_stop_where_no_layer_op_is_fused():
    linear = {kind: {t: UNFUSED for t in TOKENS} for kind in KINDS}
    assert fused_max_tokens(linear) == 0
    linear["norm"][1] = linear["norm"][2] = ROW
    linear["norm_silu"][8] = CHUNKED  # not contiguous from 1 token: does not extend the range
    linear["silu"][4] = CHUNKED  # not an op of the fused layers
    assert fused_max_tokens(linear) == 2


def test_registered_plan_drives_the_shape_rule():
    hidden = 4000  # no other test registers this width
    assert _linear_paths.linear_path(1, hidden, True, False) == ROW  # the default rule
    linear = {kind: {t: UNFUSED for t in TOKENS} for kind in KINDS}
    linear["norm_silu"][2] = CHUNKED
    _linear_paths.register_plan(hidden, DecodePlan(linear, 2, 0))
    try:
        assert _linear_paths.linear_path(1, hidden, True, False) == UNFUSED
        assert _linear_paths.linear_path(2, hidden, True, True) == CHUNKED
    finally:
        _linear_paths._PLANS.pop(hidden)


def test_reference_plan_exercises_every_path():
    plan = reference_plan(megakernel_max_batch=16)
    used = {p for paths in plan.linear.values() for p in paths.values()}
    assert used == {ROW, CHUNKED, UNFUSED}
    assert plan.megakernel_max_batch == 16 and plan.fused_max_tokens > 1000

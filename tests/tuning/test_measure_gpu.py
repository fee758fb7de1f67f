"""The first-use measurement on a real GPU: every path timed, a valid plan, in bounded time."""

import math

import pytest
import torch

from vllm_mirage.cli.tune import preset_shape
from vllm_mirage.tuning.measure import MARGIN, measure_plan
from vllm_mirage.tuning.plan import TOKENS, UNFUSED, DecodePlan

pytestmark = pytest.mark.gpu


def test_measure_plan_times_every_path_and_gives_a_valid_plan():
    plan = measure_plan(preset_shape("qwen3-0.6b"), torch.bfloat16)
    DecodePlan.from_dict(plan.to_dict(), source="round trip")
    timings = plan.notes["timings_us"]
    for kind, per_tokens in timings.items():
        assert set(per_tokens) == {str(t) for t in TOKENS}
        for tokens, by_path in per_tokens.items():
            unfused = by_path[UNFUSED]
            assert math.isfinite(unfused) and unfused > 0
            chosen = plan.linear[kind][int(tokens)]
            faster = [p for p, us in by_path.items() if p != UNFUSED and us < (1 - MARGIN) * unfused]
            if chosen == UNFUSED:
                assert not faster, (kind, tokens, by_path)
            else:
                assert by_path[chosen] == min(by_path.values()) and chosen in faster, (kind, tokens, by_path)
    assert plan.megakernel_max_batch == 0 and plan.notes["seconds"] < 300

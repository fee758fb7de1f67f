"""benchmarks/first_token_dependence.py: predictions pair up by the token they follow."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("first_token_dependence", ROOT / "benchmarks" / "first_token_dependence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_agreement_compares_predictions_after_the_same_last_token():
    m = _module()
    # whole[0] follows token 0 alone and has no counterpart; whole[j + 1] pairs with without_first[j].
    whole = [[9, 1, 2, 3], [5, 6, 7]]
    without_first = [[1, 0, 3], [6, 8]]
    r = m.agreement(whole, without_first)
    assert (r["agree"], r["positions"], r["last_position_agree"], r["prompts"]) == (3, 5, 1, 2)
    assert r["share"] == pytest.approx(0.6)


def test_agreement_refuses_prompts_that_do_not_differ_by_one_token():
    with pytest.raises(ValueError):
        _module().agreement([[1, 2]], [[1, 2]])

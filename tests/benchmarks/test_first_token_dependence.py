"""benchmarks/first_token_dependence.py: predictions pair up by the token they follow."""

import pytest

from tests.benchmarks import load_script


def test_agreement_compares_predictions_after_the_same_last_token():
    m = load_script("first_token_dependence")
    # whole[0] follows token 0 alone and has no counterpart; whole[j + 1] pairs with without_first[j].
    whole = [[9, 1, 2, 3], [5, 6, 7]]
    without_first = [[1, 0, 3], [6, 8]]
    r = m.agreement(whole, without_first)
    assert (r["agree"], r["positions"], r["last_position_agree"], r["prompts"]) == (3, 5, 1, 2)
    assert r["share"] == pytest.approx(0.6)


def test_agreement_refuses_prompts_that_do_not_differ_by_one_token():
    with pytest.raises(ValueError):
        load_script("first_token_dependence").agreement([[1, 2]], [[1, 2]])

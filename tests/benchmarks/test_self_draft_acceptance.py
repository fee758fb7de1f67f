"""benchmarks/self_draft_acceptance.py: how two runs' greedy tokens are compared."""

from tests.benchmarks import load_script

script = load_script("self_draft_acceptance")


def test_compare_counts_the_common_prefix_and_equal_tokens():
    a = {"ids": [[1, 2, 3, 4], [5, 6], [7]]}
    b = {"ids": [[1, 2, 9, 4], [5, 6], [8]]}
    assert script.compare(a, b) == {"common_prefix": [2, 2, 0], "tokens_equal": 5, "tokens": 7}

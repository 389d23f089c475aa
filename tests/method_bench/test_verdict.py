"""The method benchmark's verdict logic on synthetic losses (the smoke test runs one seed):
agree / disagree / tie / inconclusive per seed, a single reference broadcast over the seeds,
the ``mean ± half-range`` cells, and where a curve first reaches a loss."""

from __future__ import annotations

import pytest

from nemo_minitron.method_bench.experiments import mean_spread, tokens_to_reach, verdict
from tests.method_bench.test_method_bench import VERDICT


@pytest.mark.parametrize("better, worse, want", [
    ([1.0], [2.0], "agree"),
    ([2.0], [1.0], "disagree"),
    ([1.0, 2.0], [1.5, 2.5], "agree"),
    ([1.5, 2.5], [1.0, 2.0], "disagree"),
    ([1.0, 2.0], [1.0, 2.0], "tie"),
    ([1.0, 2.0], [1.0 + 1e-7, 2.0 - 1e-7], "tie"),  # equal to 1e-6
    ([1.0, 3.0], [2.0, 2.0], "inconclusive (the seeds disagree)"),
    ([1.0, 2.0], [1.0, 2.5], "inconclusive (the seeds disagree)"),  # tie at one seed only
    # One reference value (e.g. a single full-budget run) stands for every seed.
    ([1.0, 1.1], [1.2], "agree"),
    ([1.0, 1.3], [1.2], "inconclusive (the seeds disagree)"),
    ([1.3, 1.4], [1.2], "disagree"),
])
def test_verdict_per_seed(better, worse, want):
    got = verdict(better, worse)
    assert got == want
    assert VERDICT.fullmatch(f"**{got}**")  # the form the smoke test reads in the report


def test_mean_and_half_range():
    assert mean_spread([1.25]) == "1.2500"
    assert mean_spread([1.0, 2.0]) == "1.5000 ± 0.5000"
    assert mean_spread([3.0, 1.0, 2.0]) == "2.0000 ± 1.0000"


def test_tokens_to_reach_interpolates_linearly():
    curve = [[0, 4.0], [100, 3.0], [200, 1.0]]
    assert tokens_to_reach(curve, 3.0) == 100
    assert tokens_to_reach(curve, 2.0) == pytest.approx(150.0)
    assert tokens_to_reach(curve, 3.5) == pytest.approx(50.0)
    assert tokens_to_reach(curve, 0.5) is None
    assert tokens_to_reach([[0, 2.0], [10, 2.0]], 2.0) == 10

"""The method benchmark's verdict logic on synthetic losses (the smoke test runs one seed):
agree / disagree / tie / inconclusive per seed, a single reference broadcast over the seeds,
higher-is-better figures, retention from losses, the ``mean ± half-range`` cells, the
self-distillation student's depth, and where a curve first reaches a loss."""

from __future__ import annotations

import pytest

from benchmarks.method.experiments import tokens_to_reach
from benchmarks.method.instruct_sections import sdd_num_layers
from benchmarks.method.verdicts import mean_spread, retention, verdict, verdict_higher
from nemo_minitron.config import ConfigError
from tests.helpers.method_bench import VERDICT


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


@pytest.mark.parametrize("better, worse, want", [
    ([0.9], [0.8], "agree"),          # higher retention / acceptance wins
    ([0.8], [0.9], "disagree"),
    ([0.5, 0.5], [0.5, 0.5], "tie"),
    ([0.9, 0.7], [0.8, 0.8], "inconclusive (the seeds disagree)"),
    ([0.9, 0.95], [0.85], "agree"),   # one reference for every seed
])
def test_verdict_when_higher_is_better(better, worse, want):
    assert verdict_higher(better, worse) == want


def test_retention_is_the_unpruned_loss_over_the_models():
    # 2.0 / 2.5 = 0.8: the model keeps 80%; equal losses keep 100%; a lower loss exceeds it.
    assert retention(2.0, 2.5) == pytest.approx(0.8)
    assert retention(3.0, 3.0) == 1.0
    assert retention(2.0, 1.6) == pytest.approx(1.25)
    # A claim on retention with one shared unpruned loss is the claim on the losses reversed.
    u, sdd, sft = 2.0, [2.2, 2.4], [2.5, 2.6]
    assert verdict_higher([retention(u, x) for x in sdd], [retention(u, x) for x in sft]) \
        == verdict(sdd, sft) == "agree"


def test_mean_and_half_range():
    assert mean_spread([1.25]) == "1.2500"
    assert mean_spread([1.0, 2.0]) == "1.5000 ± 0.5000"
    assert mean_spread([3.0, 1.0, 2.0]) == "2.0000 ± 1.0000"
    assert mean_spread([1.0, 2.0], digits=2) == "1.50 ± 0.50"
    assert mean_spread([0.912], pct=True) == "91.2%"
    assert mean_spread([0.8, 0.9], pct=True) == "85.0% ± 5.0%"


@pytest.mark.parametrize("teacher, given, want", [
    (32, None, 26),  # 25.6 -> 26, the published 32 -> 26
    (4, None, 3),    # 3.2 -> 3
    (2, None, 1),    # 1.6 -> 2 would prune nothing: one fewer
    (4, 2, 2),
])
def test_sdd_student_depth(teacher, given, want):
    assert sdd_num_layers(teacher, given) == want


def test_sdd_student_depth_must_prune():
    with pytest.raises(ConfigError, match="instruct.num_layers=4 must be below"):
        sdd_num_layers(4, 4)
    with pytest.raises(ConfigError, match="1 layer"):
        sdd_num_layers(1, None)


def test_tokens_to_reach_interpolates_linearly():
    curve = [[0, 4.0], [100, 3.0], [200, 1.0]]
    assert tokens_to_reach(curve, 3.0) == 100
    assert tokens_to_reach(curve, 2.0) == pytest.approx(150.0)
    assert tokens_to_reach(curve, 3.5) == pytest.approx(50.0)
    assert tokens_to_reach(curve, 0.5) is None
    assert tokens_to_reach([[0, 2.0], [10, 2.0]], 2.0) == 10

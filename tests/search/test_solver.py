"""The per-layer block choice (``search.solver``) against brute force over every combination:
the solver's summed score is the least of every choice within the budget."""

from __future__ import annotations

import itertools
import random

import pytest

from nemo_minitron.config import ConfigError
from nemo_minitron.search.solver import solve


def _brute(costs: list[list[int]], scores: list[list[float]], budget: int) -> float | None:
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        if sum(costs[i][c] for i, c in enumerate(choice)) <= budget:
            s = sum(scores[i][c] for i, c in enumerate(choice))
            best = s if best is None or s < best else best
    return best


def _library(rng: random.Random, ties: bool) -> tuple[list[list[int]], list[list[float]]]:
    layers = rng.randint(2, 5)
    costs, scores = [], []
    for _ in range(layers):
        n = rng.randint(1, 5)
        costs.append([rng.randint(1_000, 200_000) for _ in range(n)])
        # Ties: scores from a handful of values, so many choices share the best sum.
        scores.append([float(rng.randint(0, 3)) if ties else rng.random() for _ in range(n)])
    return costs, scores


@pytest.mark.parametrize("seed", range(12))
def test_solver_is_optimal(seed: int) -> None:
    rng = random.Random(seed)
    costs, scores = _library(rng, ties=seed % 3 == 0)
    totals = sorted({sum(costs[i][c] for i, c in enumerate(ch))
                     for ch in itertools.product(*(range(len(c)) for c in costs))})
    for budget in (totals[0], totals[len(totals) // 2], totals[-1], totals[-1] + 5):
        choice = solve(costs, scores, budget)
        assert sum(costs[i][c] for i, c in enumerate(choice)) <= budget
        got = sum(scores[i][c] for i, c in enumerate(choice))
        assert got == pytest.approx(_brute(costs, scores, budget), abs=1e-12)


def test_only_one_combination_meets_the_budget() -> None:
    # The cheapest choice of each layer is the worst one; the budget is exactly its sum.
    costs = [[10, 20, 30], [5, 50], [7, 8, 9]]
    scores = [[3.0, 1.0, 0.0], [2.0, 0.0], [1.0, 0.5, 0.0]]
    assert solve(costs, scores, 22) == [0, 0, 0]
    assert solve(costs, scores, 89) == [2, 1, 2]  # everything fits: the best of each


def test_close_scores_are_told_apart() -> None:
    # Differences far below HiGHS's absolute gap (1e-6) of unscaled scores.
    costs = [[1, 2], [1, 2]]
    scores = [[1e-9, 0.0], [2e-9, 0.0]]  # at budget 3: [1, 0] costs 2e-9, [0, 1] 1e-9
    assert solve(costs, scores, 3) == [0, 1]


def test_unreachable_budget_and_empty_library() -> None:
    with pytest.raises(ConfigError, match="smallest reachable is 12 parameters"):
        solve([[10, 20], [2, 3]], [[0.0, 0.0], [0.0, 0.0]], 11)
    with pytest.raises(ConfigError, match="layer 1 is empty"):
        solve([[10, 20], []], [[0.0, 0.0], []], 100)

"""One block per layer, minimising the summed block scores under a budget: an exact
mixed-integer program (``scipy.optimize.milp``, HiGHS's branch and bound with a zero gap).

Variables: one binary ``x[l, c]`` per layer ``l`` and candidate ``c``; ``sum_c x[l, c] = 1`` for
every layer; one linear budget row ``sum cost[l, c] * x[l, c] <= budget``; objective
``sum score[l, c] * x[l, c]``. The solver's answer is re-checked in exact integer arithmetic (a
floating-point budget row must not let an over-budget choice through).
"""

from __future__ import annotations

from collections.abc import Sequence

from nemo_minitron.config import ConfigError


def smallest_cost(costs: Sequence[Sequence[int]]) -> int:
    """The smallest budget any choice meets (the cheapest block of every layer)."""
    return sum(min(c) for c in costs)


def check_library(costs: Sequence[Sequence[int]], scores: Sequence[Sequence[float]],
                  budget: int, unit: str = "parameters") -> None:
    """One-line errors for an empty layer library, mismatched lists or a budget below the
    cheapest choice."""
    if len(costs) != len(scores):
        raise ValueError(f"{len(costs)} layers of costs, {len(scores)} of scores")
    for i, (c, s) in enumerate(zip(costs, scores)):
        if not c:
            raise ConfigError(f"the block library of layer {i} is empty (search.blocks allows "
                              f"no block there)")
        if len(c) != len(s):
            raise ValueError(f"layer {i}: {len(c)} costs, {len(s)} scores")
    low = smallest_cost(costs)
    if budget < low:
        raise ConfigError(f"search.target_params={budget}: no combination of blocks meets it; "
                          f"the smallest reachable is {low} {unit}")


def solve(costs: Sequence[Sequence[int]], scores: Sequence[Sequence[float]],
          budget: int, unit: str = "parameters") -> list[int]:
    """The candidate index of every layer with the least summed score among the choices whose
    summed cost is at most ``budget`` (ties: any of the best)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    check_library(costs, scores, budget, unit)
    sizes = [len(c) for c in costs]
    n = sum(sizes)
    starts = np.cumsum([0, *sizes])
    one_hot = np.zeros((len(sizes), n))
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        one_hot[i, a:b] = 1
    # The fixed part (every layer's cheapest block) leaves small numbers in the budget row.
    base = smallest_cost(costs)
    cost = np.array([c - min(layer) for layer in costs for c in layer], dtype=float)
    score = np.array([s for layer in scores for s in layer], dtype=float)
    # HiGHS stops within an absolute objective gap of 1e-6: scaled up, that gap is 1e-12 of
    # the largest score, so scores closer than that are the only ones it may confuse.
    score = score * (1e6 / max(1e-300, float(np.abs(score).max())))
    res = milp(score, integrality=np.ones(n), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_hot, 1, 1),
                            LinearConstraint(cost[None, :], -np.inf, budget - base)],
               options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise ConfigError(f"search.target_params={budget}: the solver found no choice of "
                          f"blocks ({res.message})")
    choice = [int(np.argmax(res.x[a:b])) for a, b in zip(starts[:-1], starts[1:])]
    spent = sum(costs[i][c] for i, c in enumerate(choice))
    if spent > budget:
        raise AssertionError(f"the solver's choice costs {spent} > budget {budget}")
    return choice

"""How the method benchmark states its numbers: mean and spread over seeds, the per-seed
verdict on a claim, and retention relative to the unpruned model.

With paired seeds, a claim "A beats B" is *agree* when A beats B at every seed, *disagree* when
B beats A at every seed, *tie* when they are equal at every seed, else *inconclusive*.
"""

from __future__ import annotations

import statistics
from typing import Any

Section = dict[str, Any]
"""One section of the report: claim, table, verdict, curves."""


def mean_spread(xs: list[float], pct: bool = False, digits: int = 4) -> str:
    """``mean ± half-range`` (just the value for one seed) to ``digits`` decimals; ``pct``:
    fractions as percent with one decimal."""
    m, h = statistics.fmean(xs), (max(xs) - min(xs)) / 2
    if pct:
        return f"{100 * m:.1f}%" if len(xs) == 1 else f"{100 * m:.1f}% ± {100 * h:.1f}%"
    return f"{m:.{digits}f}" if len(xs) == 1 else f"{m:.{digits}f} ± {h:.{digits}f}"


def verdict(better: list[float], worse: list[float]) -> str:
    """Does ``better`` (the claimed winner) have the lower loss, seed by seed?"""
    if len(worse) == 1 and len(better) > 1:
        worse = worse * len(better)
    d = [w - b for b, w in zip(better, worse)]
    if all(abs(x) < 1e-6 for x in d):
        return "tie"
    if all(x > 0 for x in d):
        return "agree"
    if all(x < 0 for x in d):
        return "disagree"
    return "inconclusive (the seeds disagree)"


def verdict_higher(better: list[float], worse: list[float]) -> str:
    """``verdict`` for a figure where higher is better (retention, acceptance rate)."""
    return verdict([-x for x in better], [-x for x in worse])


def retention(unpruned_loss: float, loss: float) -> float:
    """Quality retained by a model relative to the unpruned one, from validation losses:
    ``unpruned_loss / loss`` (1.0: as good as the unpruned model; below 1: worse). The loss
    analogue of the published accuracy retention, pruned accuracy / unpruned accuracy."""
    return unpruned_loss / loss


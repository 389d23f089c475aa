"""Timing that survives a noisy machine: variants interleaved within every repeat, ratios
formed per repeat, and the median with its spread reported beside the best.

The garbage collector is off while a call is timed (and a collection runs before each), as in
``timeit``: otherwise a collection triggered by one variant's garbage lands on whichever runs
next.

A ratio of two timings taken seconds apart is hostage to whatever else the machine did in
between; interleaving puts the variants of one repeat under the same load, and the per-repeat
ratio cancels most of it. The spread (max - min of the per-repeat ratios, relative to their
median) says whether the run can be trusted: above ``MAX_SPREAD`` the benchmark prints that
the machine was too noisy to conclude.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_SPREAD = 0.10
"""Relative spread of the per-repeat ratios above which a run is called inconclusive."""


@dataclass(frozen=True)
class Stat:
    """Median, best and spread of one series (timings or ratios)."""

    median: float
    best: float
    """Minimum: the least disturbed sample."""
    lo: float
    hi: float
    n: int

    @property
    def spread(self) -> float:
        """``(hi - lo) / median``: 0 on a quiet machine."""
        return (self.hi - self.lo) / self.median if self.median else float("inf")

    @property
    def conclusive(self) -> bool:
        return self.spread <= MAX_SPREAD

    def fmt(self, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
        f = f"{{:.{digits}f}}"
        m, lo, hi = (f.format(v * scale) for v in (self.median, self.lo, self.hi))
        return (f"median {m}{unit} (range {lo}-{hi}, spread {self.spread:.0%}, n={self.n})"
                + ("" if self.conclusive else "  [spread too large to conclude]"))


def stat(samples: list[float]) -> Stat:
    """Summary of ``samples``."""
    if not samples:
        raise ValueError("no samples")
    return Stat(statistics.median(samples), min(samples), min(samples), max(samples),
                len(samples))


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                own_clock: frozenset[str] = frozenset()) -> dict[str, list[float]]:
    """Seconds per call of each of ``runs``, the variants taking turns within every repeat
    (after ``warmup`` untimed rounds). A run named in ``own_clock`` returns its own seconds
    (it times only part of what it does, e.g. a decode loop after an untimed prefill)."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    enabled = gc.isenabled()
    try:
        for r in range(warmup + repeats):
            for name, fn in runs.items():
                # As timeit does: a collection that one variant's garbage triggers would be
                # charged to whichever variant happens to run then.
                gc.collect()
                gc.disable()
                t0 = time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t0
                if name in own_clock:
                    dt = float(out)  # type: ignore[arg-type]
                gc.enable()
                if r >= warmup:
                    times[name].append(dt)
    finally:
        if not enabled:
            gc.disable()
    return times


def ratios(num: list[float], den: list[float]) -> list[float]:
    """Per-repeat ratios ``num[i] / den[i]`` (same load within a repeat)."""
    return [a / b for a, b in zip(num, den, strict=True)]

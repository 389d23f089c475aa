"""What a finished ``prune`` hands to later stages (search, demo): its summary and its
importance scores, stored in ``<pruned checkpoint>/pruning/``. This module owns that
directory's layout; other stages read it through ``read`` only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nemo_minitron.importance.scores import Scores

REPORT_DIR = "pruning"
"""The report directory inside a pruned checkpoint (also holds ``report.md`` and plots)."""
SUMMARY = "summary.json"
"""The summary ``prune`` returned (parameter counts, losses, kept layers)."""
SCORES = "scores.pt"
"""The importance scores the plan was made from (``Scores.save``)."""


@dataclass(frozen=True)
class PruneResult:
    """A finished prune into ``checkpoint``."""

    checkpoint: Path
    """The pruned checkpoint directory."""
    summary: dict[str, Any]
    """What ``prune`` returned: source/pruned parameters and validation losses, kept layers."""

    @property
    def scores(self) -> Path:
        """The importance scores file (reusable as ``scores=FILE`` of another prune)."""
        return report_dir(self.checkpoint) / SCORES


def report_dir(out: str | os.PathLike[str]) -> Path:
    """Where ``prune`` writes its report next to the pruned checkpoint ``out``."""
    return Path(out) / REPORT_DIR


def write(out: str | os.PathLike[str], scores: Scores, summary: dict[str, Any]) -> Path:
    """Write the scores and the summary into ``out``'s (new) report directory; returns it."""
    from nemo_minitron.utils.fs import atomic_write_json

    report = report_dir(out)
    report.mkdir()
    scores.save(report / SCORES)
    atomic_write_json(report / SUMMARY, summary)
    return report


def read(out: str | os.PathLike[str]) -> PruneResult | None:
    """The result of a finished ``prune`` into ``out``; None when it did not finish (the report
    appears with the checkpoint, in one rename)."""
    from nemo_minitron.utils.fs import read_json

    f = report_dir(out) / SUMMARY
    if not f.is_file():
        return None
    return PruneResult(checkpoint=Path(out),
                       summary=read_json(f, f"; remove {out} to prune again"))

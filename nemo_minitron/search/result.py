"""Where a ``search`` leaves its results: the winner checkpoint, a copy of the best
candidate's retrained checkpoint at ``<out>/winner`` (a pipeline's next stage reads it), and
each candidate's directory (the launcher's fan-out submits and checks candidates by it)."""

from __future__ import annotations

import os
from pathlib import Path

WINNER = "winner"
"""The winner checkpoint's directory under the search's output directory."""


def winner_dir(out: str | os.PathLike[str]) -> Path:
    """The winner checkpoint of a search into ``out`` (complete once it exists)."""
    return Path(out) / WINNER


SEARCH_DIR = "search"
"""The search's own files under its output directory (scores, candidates, report)."""


def search_dir(out: str | os.PathLike[str]) -> Path:
    """The directory of a search into ``out`` holding its candidates and report."""
    return Path(out) / SEARCH_DIR


def candidate_dir(root: Path, name: str) -> Path:
    """Candidate ``name``'s directory under a search's ``root`` (``search_dir``): its
    ``pruned`` checkpoint, its distillation run and its ``result.json``."""
    return root / "candidates" / name


def candidate_run(root: Path, name: str) -> Path:
    """Candidate ``name``'s distillation run (its checkpoints) under a search's ``root``."""
    return candidate_dir(root, name) / "distill"

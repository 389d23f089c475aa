"""What a finished ``search`` hands to later stages: the winner's checkpoint, a copy of the
best candidate's retrained checkpoint at ``<out>/winner`` (a pipeline's next stage reads it)."""

from __future__ import annotations

import os
from pathlib import Path

WINNER = "winner"
"""The winner checkpoint's directory under the search's output directory."""


def winner_dir(out: str | os.PathLike[str]) -> Path:
    """The winner checkpoint of a search into ``out`` (complete once it exists)."""
    return Path(out) / WINNER

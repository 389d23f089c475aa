"""What later stages need to know about a pruned checkpoint, stored in its own metadata
(``checkpoint.io.load_metadata``): the source layer each kept layer came from, the source
shape, and the importance method."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_minitron.config import ModelConfig, from_dict, to_dict

KEY = "pruning"
"""The checkpoint-metadata key of the pruning origin."""
LEGACY_SUMMARY = ("pruning", "summary.json")
"""Where checkpoints pruned before the metadata existed kept their layer list."""


@dataclass
class PruneOrigin:
    """How a pruned checkpoint was cut from its source."""

    kept_layers: list[int]
    """Source layer (0-based) of every layer of the pruned model, in order."""
    source: ModelConfig | None = None
    """Config of the source model (None for checkpoints pruned before it was recorded)."""
    importance: str | None = None
    """Importance criterion that chose the kept units (activation, magnitude, random, or a
    saved scores file); None when unknown."""

    def to_metadata(self) -> dict[str, Any]:
        """The checkpoint metadata entry (``save_checkpoint(metadata=...)``)."""
        return {KEY: {"kept_layers": list(self.kept_layers), "importance": self.importance,
                      "source": None if self.source is None else to_dict(self.source)}}


def prune_origin(checkpoint: str | os.PathLike[str]) -> PruneOrigin | None:
    """The pruning origin of ``checkpoint``; None when it was not pruned (or is not a
    checkpoint). Older pruned checkpoints without the metadata give their kept layers from
    ``pruning/summary.json``."""
    from nemo_minitron.checkpoint.io import is_checkpoint, load_metadata

    p = Path(checkpoint)
    entry = load_metadata(p).get(KEY) if is_checkpoint(p) else None
    if isinstance(entry, dict):
        src = entry.get("source")
        return PruneOrigin(kept_layers=[int(i) for i in entry["kept_layers"]],
                           source=None if src is None else from_dict(ModelConfig, src, "model."),
                           importance=entry.get("importance"))
    legacy = p.joinpath(*LEGACY_SUMMARY)
    if legacy.is_file():
        kept = json.loads(legacy.read_text()).get("kept_layers")
        if kept:
            return PruneOrigin(kept_layers=[int(i) for i in kept])
    return None

"""Importance scores of every prunable unit, saved once and reused for any pruning target."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemo_minitron.checkpoint.safety import load_weights_only
from nemo_minitron.config import ConfigError


@dataclass
class Scores:
    """Per-axis scores (higher = more important), for the whole (unsharded) model."""

    ffn_hidden_size: torch.Tensor
    """``[num_layers, ffn_hidden_size]``: MLP neurons, per layer."""
    num_attention_heads: torch.Tensor
    """``[num_layers, num_attention_heads]``: attention heads, per layer."""
    num_query_groups: torch.Tensor
    """``[num_layers, num_query_groups]``: KV groups (sum of their heads), per layer."""
    hidden_size: torch.Tensor
    """``[hidden_size]``: embedding channels, summed over every layer's norms."""
    num_layers: torch.Tensor
    """``[num_layers]``: Block Importance, 1 - cos(layer input, layer output), token mean."""
    angular_distance: torch.Tensor | None = None
    """``[num_layers + 1, num_layers + 1]``: token mean of arccos(cos)/pi between the hidden
    states entering layers ``i`` and ``j`` (index ``num_layers``: the last layer's output,
    before the final norm); None where no activations were seen (baselines, older files)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """How the scores were made: model config, aggregation, calibration size."""

    AXES = ("ffn_hidden_size", "num_attention_heads", "num_query_groups", "hidden_size",
            "num_layers")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a ``.pt`` file of tensors and plain metadata (loadable with weights_only)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        extra = {} if self.angular_distance is None else {
            "angular_distance": self.angular_distance}
        torch.save({**{a: getattr(self, a) for a in self.AXES}, **extra, "meta": self.meta},
                   tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Scores:
        """Inverse of ``save``."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"scores={str(path)!r} does not exist")
        if not zipfile.is_zipfile(p):  # what torch.save writes; anything else is not ours
            raise ConfigError(f"scores={str(path)!r} is not a scores file (not a torch.save "
                              f"archive; prune writes one as OUT/pruning/scores.pt)")
        data = load_weights_only(p, f"scores={str(path)!r}")
        if not isinstance(data, dict):
            raise ConfigError(f"scores={str(path)!r} is not a scores file (it holds a "
                              f"{type(data).__name__}, not a dict of tensors)")
        missing = [a for a in cls.AXES if a not in data]
        if missing:
            raise ConfigError(f"scores={str(path)!r} is not a scores file (no {missing[0]})")
        return cls(**{a: data[a] for a in cls.AXES}, angular_distance=data.get("angular_distance"),
                   meta=data.get("meta", {}))

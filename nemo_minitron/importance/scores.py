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


def keep_best(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best scores, in ascending index order (ties: lower index wins):
    the units a pruning keeps."""
    order = torch.sort(-scores.double(), stable=True).indices[:k]
    return order.sort().values


@dataclass
class Scores:
    """Per-axis scores (higher = more important), for the whole (unsharded) model."""

    ffn: torch.Tensor
    """``[num_layers, ffn_hidden_size]``: MLP neurons, per layer."""
    heads: torch.Tensor
    """``[num_layers, num_attention_heads]``: attention heads, per layer."""
    groups: torch.Tensor
    """``[num_layers, num_query_groups]``: KV groups (sum of their heads), per layer."""
    hidden: torch.Tensor
    """``[hidden_size]``: embedding channels, summed over every layer's norms."""
    layers: torch.Tensor
    """``[num_layers]``: Block Importance, 1 - cos(layer input, layer output), token mean."""
    angular_distance: torch.Tensor | None = None
    """``[num_layers + 1, num_layers + 1]``: token mean of arccos(cos)/pi between the hidden
    states entering layers ``i`` and ``j`` (index ``num_layers``: the last layer's output,
    before the final norm); None where no activations were seen (baselines, older files)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """How the scores were made: model config, aggregation, calibration size."""
    experts: torch.Tensor | None = None
    """MoE ``[num_layers, num_moe_experts]``: token mean L2 norm of each expert's router-weighted
    output (0 for a token not routed to it); None for a dense model (``importance/moe.py``)."""
    expert_mass: torch.Tensor | None = None
    """MoE ``[num_layers, num_moe_experts]``: the router's probability mass, the token mean of
    the expert's routing weight (0 when never routed to)."""
    expert_load: torch.Tensor | None = None
    """MoE ``[num_layers, num_moe_experts]``: share of tokens routed to each expert."""
    expert_ffn: torch.Tensor | None = None
    """MoE ``[num_layers, moe_ffn_hidden_size]``: expert channels, one score per channel for
    all experts of a layer."""
    expert_channels: torch.Tensor | None = None
    """MoE ``[num_layers, num_moe_experts, moe_ffn_hidden_size]``: each expert's own channel
    scores (``target.moe_ffn_selection=per_expert``); None in files written before them."""
    shared_expert_ffn: torch.Tensor | None = None
    """MoE ``[num_layers, moe_shared_expert_intermediate_size]``: shared-expert channels."""

    AXES = ("ffn", "heads", "groups", "hidden", "layers")
    SIZES = {"ffn": "ffn_hidden_size", "heads": "num_attention_heads",
             "groups": "num_query_groups", "hidden": "hidden_size", "layers": "num_layers"}
    """The config field that counts the units of each axis."""
    MOE_AXES = ("experts", "expert_mass", "expert_load", "expert_ffn", "expert_channels",
                "shared_expert_ffn")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a ``.pt`` file of tensors and plain metadata (loadable with weights_only)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        extra = {a: getattr(self, a) for a in ("angular_distance", *self.MOE_AXES)
                 if getattr(self, a) is not None}
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
        # Files written before the axes were renamed hold them under the config field names
        # (``SIZES``); they stay readable.
        data = {a: data[a] if a in data else data.get(cls.SIZES[a]) for a in cls.AXES} | {
            k: data[k] for k in ("angular_distance", "meta", *cls.MOE_AXES) if k in data}
        missing = [a for a in cls.AXES if data[a] is None]
        if missing:
            raise ConfigError(f"scores={str(path)!r} is not a scores file (no {missing[0]})")
        return cls(**{a: data[a] for a in cls.AXES}, angular_distance=data.get("angular_distance"),
                   meta=data.get("meta", {}), **{a: data.get(a) for a in cls.MOE_AXES})

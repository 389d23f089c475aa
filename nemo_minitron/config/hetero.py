"""Per-layer shapes of a heterogeneous model (megatron-core's ``TransformerBlockConfig``: each
layer's attention and MLP are full, a linear replacement or a no-op, and a full one may have
its own ``num_query_groups`` / ``ffn_hidden_size``).

Megatron keeps ``num_attention_heads`` (and ``kv_channels``) the same in every layer, as the
published block-config format does (``n_heads_in_group``); a layer with fewer query groups has
more query heads per group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nemo_minitron.config.errors import ConfigError, positive

Block = Literal["full", "linear", "no_op"]
"""A block's kind: the full sublayer, one hidden x hidden linear layer (after the sublayer's
norm), or nothing (the residual stream passes through)."""


@dataclass(kw_only=True)
class LayerShape:
    """The shape of one transformer layer of a heterogeneous model."""

    attention: Block = "full"
    """The self-attention block: full, linear replacement or no-op."""
    num_query_groups: int | None = None
    """Query groups of a full attention block; None: the model's ``num_query_groups``."""
    mlp: Block = "full"
    """The MLP block: full, linear replacement or no-op."""
    ffn_hidden_size: int | None = None
    """Intermediate size of a full MLP block; None: the model's ``ffn_hidden_size``."""

    def __post_init__(self) -> None:
        for kind, size, name in ((self.attention, self.num_query_groups, "num_query_groups"),
                                 (self.mlp, self.ffn_hidden_size, "ffn_hidden_size")):
            if kind not in ("full", "linear", "no_op"):
                raise ConfigError(f"{name.split('_')[0]} block {kind!r} must be one of "
                                  "full, linear, no_op")
            if size is not None:
                positive(name, size)
                if kind != "full":
                    raise ConfigError(f"{name}={size} is set on a {kind} block (only a full "
                                      f"block has a size)")


def check_layer_shapes(shapes: list[LayerShape], num_layers: int, num_attention_heads: int
                       ) -> None:
    """One-line error naming the layer for shapes that do not fit the model."""
    if len(shapes) != num_layers:
        raise ConfigError(f"model.layer_shapes has {len(shapes)} entries; model.num_layers is "
                          f"{num_layers}")
    for i, s in enumerate(shapes):
        if s.num_query_groups is not None and num_attention_heads % s.num_query_groups:
            raise ConfigError(f"model.layer_shapes[{i}].num_query_groups={s.num_query_groups} "
                              f"does not divide model.num_attention_heads="
                              f"{num_attention_heads}")


def resolved(s: LayerShape, num_query_groups: int, ffn_hidden_size: int) -> LayerShape:
    """``s`` with the model's sizes filled in where a full block does not set its own."""
    return LayerShape(
        attention=s.attention, mlp=s.mlp,
        num_query_groups=s.num_query_groups or num_query_groups if s.attention == "full" else None,
        ffn_hidden_size=s.ffn_hidden_size or ffn_hidden_size if s.mlp == "full" else None)

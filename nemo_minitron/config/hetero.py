"""Per-layer shapes of a heterogeneous model (megatron-core's ``TransformerBlockConfig``: each
layer's attention and MLP are full, a linear replacement or a no-op, and a full one may have
its own ``num_query_groups`` / ``ffn_hidden_size``).

Megatron keeps ``num_attention_heads`` (and ``kv_channels``) the same in every layer, as the
published block-config format does (``n_heads_in_group``); a layer with fewer query groups has
more query heads per group."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

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
        # A size on a linear or no-op block: check_layer_shapes (its error names the layer).


def check_layer_shapes(shapes: list[LayerShape], num_layers: int, num_attention_heads: int
                       ) -> None:
    """One-line error naming the layer for shapes that do not fit the model."""
    if len(shapes) != num_layers:
        raise ConfigError(f"model.layer_shapes has {len(shapes)} entries; model.num_layers is "
                          f"{num_layers}")
    for i, s in enumerate(shapes):
        for kind, name in ((s.attention, "num_query_groups"), (s.mlp, "ffn_hidden_size")):
            if getattr(s, name) is not None and kind != "full":
                raise ConfigError(f"model.layer_shapes[{i}].{name}={getattr(s, name)} is set on "
                                  f"a {kind} block (only a full block has a size)")
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


def block_configs(shapes: list[LayerShape]) -> list[dict]:
    """megatron-core's ``block_configs`` (``HeterogeneousTransformerConfig``) of resolved
    ``shapes``, every full block with its explicit ``num_query_groups`` / ``ffn_hidden_size``
    (so the heterogeneous spec maps its norms to the uniform model's checkpoint keys)."""
    return [{"attention": {"no_op": s.attention == "no_op",
                           "replace_with_linear": s.attention == "linear",
                           "num_query_groups": s.num_query_groups},
             "ffn": {"no_op": s.mlp == "no_op", "replace_with_linear": s.mlp == "linear",
                     "ffn_hidden_size": s.ffn_hidden_size}} for s in shapes]


def hetero_fields(cfg: Any) -> dict[str, Any]:
    """The ``HeterogeneousTransformerConfig`` fields of ``ModelConfig`` ``cfg`` (none for a
    uniform model)."""
    if not cfg.is_heterogeneous:
        return {}
    shapes = [cfg.layer_shape(i) for i in range(cfg.num_layers)]
    return {"heterogeneous_layers_config_encoded_json":
            json.dumps({"block_configs": block_configs(shapes)})}


def shapes_from_blocks(blocks: list[Any]) -> list[LayerShape]:
    """The layer shapes of megatron-core's ``per_block_parameters``
    (``TransformerBlockConfig``s); a one-line error for a block both no-op and linear."""
    def kind(block: Any, where: str) -> Block:
        if block.no_op and block.replace_with_linear:
            raise ConfigError(f"{where}: no_op and replace_with_linear are both set")
        return "no_op" if block.no_op else "linear" if block.replace_with_linear else "full"

    shapes = []
    for i, b in enumerate(blocks):
        attention, mlp = kind(b.attention, f"block {i} attention"), kind(b.mlp, f"block {i} ffn")
        ffn = b.mlp.ffn_hidden_size
        shapes.append(LayerShape(
            attention=attention, mlp=mlp,
            num_query_groups=b.attention.num_query_groups if attention == "full" else None,
            ffn_hidden_size=int(ffn) if ffn is not None and mlp == "full" else None))
    return shapes


def as_uniform(cfg: Any) -> Any:
    """The uniform ``ModelConfig`` of heterogeneous ``cfg`` when every layer has the same full
    shape (what a plain Llama holds), else None; a uniform ``cfg`` itself."""
    if not cfg.is_heterogeneous:
        return cfg
    first = cfg.layer_shape(0)
    if first.attention != "full" or first.mlp != "full" or any(
            cfg.layer_shape(i) != first for i in range(1, cfg.num_layers)):
        return None
    return cfg.layer_config(0)

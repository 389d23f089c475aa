"""The Hugging Face block-config format of the published heterogeneous Llama-Nemotron models
(``DeciLMForCausalLM``, ``model_type: nemotron-nas``) <-> a heterogeneous ``ModelConfig``.

``config.json`` holds one ``block_configs`` entry per layer: ``attention`` with ``no_op``,
``replace_with_linear`` and ``n_heads_in_group`` (query heads per key/value group: heads /
``num_query_groups``), ``ffn`` with ``no_op``, ``replace_with_linear`` and ``ffn_mult``, whose
intermediate size is ``find_multiple(int(2 * ffn_mult * hidden / 3), 256)``. Only multiples of
256 are expressible that way, so a width that is not also gets an explicit
``intermediate_size`` (and megatron-core's own ``ffn_hidden_size``, which its
``HeterogeneousTransformerConfig`` reads before ``ffn_mult``); readers of the published format
that know only ``ffn_mult`` cannot load such a block. The weights keep Llama's names; a linear
replacement is ``self_attn.linear_attn.weight`` / ``mlp.linear_mlp.weight``, and a no-op block
has neither weights nor its norm. Reading never runs the repository's modeling code
(``transformers`` has no DeciLM class: this module is the reader)."""

from __future__ import annotations

from typing import Any

from nemo_minitron.config import ConfigError
from nemo_minitron.config.hetero import LayerShape

DECILM_ARCH = "DeciLMForCausalLM"
"""``architectures[0]`` of the block-config format."""
DECILM_MODEL_TYPE = "nemotron-nas"
"""``model_type`` of the block-config format."""
_KNOWN = {"attention": {"no_op", "replace_with_linear", "n_heads_in_group", "num_query_groups"},
          "ffn": {"no_op", "replace_with_linear", "ffn_mult", "intermediate_size",
                  "ffn_hidden_size"}}
"""Block keys read here; any other key with a value that is set (sparsify, sliding windows,
sinks, Mamba, MoE, ...) is refused."""


def ffn_mult_size(ffn_mult: float, hidden: int) -> int:
    """The intermediate size the published format gives ``ffn_mult`` at width ``hidden``."""
    n = int(2 * ffn_mult * hidden / 3)
    return -(-n // 256) * 256


def _ffn_mult(f: int, hidden: int) -> float:
    return round(3 * f / (2 * hidden), 6)


def block_configs_hf(cfg: Any) -> list[dict[str, Any]]:
    """``block_configs`` of heterogeneous ``ModelConfig`` ``cfg`` (module docstring)."""
    blocks = []
    for i in range(cfg.num_layers):
        s = cfg.layer_shape(i)
        attn: dict[str, Any] = {"no_op": s.attention == "no_op",
                                "replace_with_linear": s.attention == "linear",
                                "n_heads_in_group": None}
        if s.attention == "full":
            attn["n_heads_in_group"] = cfg.num_attention_heads // s.num_query_groups
        ffn: dict[str, Any] = {"no_op": s.mlp == "no_op", "replace_with_linear": s.mlp == "linear",
                               "ffn_mult": None}
        if s.mlp == "full":
            ffn["ffn_mult"] = _ffn_mult(s.ffn_hidden_size, cfg.hidden_size)
            if ffn_mult_size(ffn["ffn_mult"], cfg.hidden_size) != s.ffn_hidden_size:
                ffn.update(intermediate_size=s.ffn_hidden_size,
                           ffn_hidden_size=s.ffn_hidden_size)
        blocks.append({"attention": attn, "ffn": ffn})
    return blocks


def _flag(block: dict[str, Any], key: str, where: str) -> bool:
    v = block.get(key, False)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}.{key}={v!r} must be true or false")
    return v


def _size(block: dict[str, Any], key: str, where: str) -> int | None:
    v = block.get(key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise ConfigError(f"{where}.{key}={v!r} must be a positive integer")
    return v


def layer_shapes_from_hf(hf: dict[str, Any]) -> list[LayerShape]:
    """The layer shapes of a block-config ``config.json`` (one-line errors naming the block)."""
    blocks, heads, hidden = hf.get("block_configs"), hf["num_attention_heads"], hf["hidden_size"]
    if not isinstance(blocks, list) or len(blocks) != hf["num_hidden_layers"]:
        raise ConfigError(f"config.json block_configs must be a list of num_hidden_layers="
                          f"{hf['num_hidden_layers']} blocks")
    shapes = []
    for i, block in enumerate(blocks):
        kinds: dict[str, str] = {}
        for part in ("attention", "ffn"):
            where = f"config.json block_configs[{i}].{part}"
            b = block.get(part) if isinstance(block, dict) else None
            if not isinstance(b, dict):
                raise ConfigError(f"{where} must be an object")
            extra = sorted(k for k, v in b.items() if k not in _KNOWN[part] and v)
            if extra:
                raise ConfigError(f"{where}.{extra[0]}={b[extra[0]]!r} is not supported")
            no_op, linear = _flag(b, "no_op", where), _flag(b, "replace_with_linear", where)
            if no_op and linear:
                raise ConfigError(f"{where}: no_op and replace_with_linear are both true")
            kinds[part] = "no_op" if no_op else "linear" if linear else "full"
        a, f = block["attention"], block["ffn"]
        where = f"config.json block_configs[{i}]"
        groups = _size(a, "num_query_groups", where + ".attention")
        per = _size(a, "n_heads_in_group", where + ".attention")
        if kinds["attention"] == "full" and groups is None:
            if per is None or heads % per:
                raise ConfigError(f"{where}.attention.n_heads_in_group={per!r} must divide "
                                  f"num_attention_heads={heads}")
            groups = heads // per
        width = _size(f, "ffn_hidden_size", where + ".ffn") or _size(
            f, "intermediate_size", where + ".ffn")
        mult = f.get("ffn_mult")
        if kinds["ffn"] == "full" and width is None:
            if not isinstance(mult, int | float) or isinstance(mult, bool) or mult <= 0:
                raise ConfigError(f"{where}.ffn.ffn_mult={mult!r} must be a positive number")
            width = ffn_mult_size(mult, hidden)
        full_a, full_f = kinds["attention"] == "full", kinds["ffn"] == "full"
        shapes.append(LayerShape(attention=kinds["attention"], mlp=kinds["ffn"],  # type: ignore[arg-type]
                                 num_query_groups=groups if full_a else None,
                                 ffn_hidden_size=width if full_f else None))
    return shapes


def decilm_model_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` fields a Llama config has and the block-config format need not
    (``intermediate_size``, ``num_key_value_heads``: the widest block's), and the shapes."""
    shapes = layer_shapes_from_hf(hf)
    widths = [s.ffn_hidden_size for s in shapes if s.ffn_hidden_size] or [hf["hidden_size"]]
    groups = [s.num_query_groups for s in shapes if s.num_query_groups]
    return {"intermediate_size": max(widths),
            "num_key_value_heads": max(groups or [hf["num_attention_heads"]]),
            "layer_shapes": shapes}

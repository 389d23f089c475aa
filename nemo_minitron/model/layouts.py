"""Megatron-core ``GPTModel`` weight layouts: the one place that knows how fused tensors are laid
out. Everything that slices, converts or merges weights calls these helpers.

The full (TP=1) layouts, checked against megatron-core's own layers in
``tests/model/test_layouts.py``:

- ``linear_qkv`` rows come in one block per query group, ``[q heads of the group; k; v]``, each
  head ``kv_channels`` rows: ``[q0 q1 .. k0 v0 | q2 q3 .. k1 v1 | ...]``. Query head ``j``
  belongs to group ``j // (heads / groups)``.
- SwiGLU ``linear_fc1`` rows are ``[gate (ffn); up (ffn)]``; under TP every rank holds
  ``[gate_r; up_r]`` (its slice of each half), not a slice of the concatenation.
- ``linear_proj`` columns are the heads' outputs in head order, ``kv_channels`` per head.
- The embedding and output layer are vocab-parallel: rank ``r`` of ``TP`` holds the contiguous
  rows ``[r * V/TP, (r + 1) * V/TP)`` of the vocabulary padded up to a multiple of
  ``make_vocab_size_divisible_by`` (logit columns likewise).
- A ``TransformerLayer``'s ``layer_number`` is global (counted over pipeline stages) and
  1-based; state-dict keys ``decoder.layers.<i>`` are local to the stage and 0-based.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nemo_minitron.config import ModelConfig

LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
"""A per-layer state-dict key: ``decoder.layers.<index>.<layer-local name>``."""

QKV = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
"""Layer-local names of the fused QKV tensors."""
FC1 = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")
"""Layer-local names of the MLP's first linear (fused ``[gate; up]`` under SwiGLU)."""
_ANY_FC1 = ("linear_fc1.weight", "linear_fc1.bias")


def global_layer(layer: torch.nn.Module) -> int:
    """0-based global index of a ``TransformerLayer`` (its ``layer_number`` is 1-based)."""
    return int(layer.layer_number) - 1


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of this pipeline stage's first layer (0 for a stage without layers)."""
    layers = model.decoder.layers
    return global_layer(layers[0]) if len(layers) else 0


def global_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """This stage's layers by 0-based global index."""
    return {global_layer(layer): layer for layer in model.decoder.layers}


def layer_key(layer: int, name: str) -> str:
    """State-dict key of the layer-local ``name`` of layer ``layer``."""
    return f"decoder.layers.{layer}.{name}"


def split_layer_key(key: str) -> tuple[int, str] | None:
    """``(layer index, layer-local name)`` of a per-layer key, None for other keys."""
    m = LAYER_KEY.match(key)
    return None if m is None else (int(m.group(1)), m.group(2))


# ---- fused QKV --------------------------------------------------------------------------------

def heads_per_group(cfg: ModelConfig) -> int:
    """Query heads in one query group."""
    return cfg.num_attention_heads // cfg.query_groups


def heads_by_group(per_head: torch.Tensor, groups: int) -> torch.Tensor:
    """``[..., heads]`` -> ``[..., groups, heads per group]``: the heads of query group ``g``
    are the consecutive heads ``g * per .. (g + 1) * per - 1``."""
    return per_head.reshape(*per_head.shape[:-1], groups, per_head.shape[-1] // groups)


def group_heads(cfg: ModelConfig, group: int) -> torch.Tensor:
    """Global indices of the query heads of query group ``group``."""
    per = heads_per_group(cfg)
    return torch.arange(group * per, (group + 1) * per)


def qkv_group_rows(cfg: ModelConfig, group: int) -> torch.Tensor:
    """Rows of ``linear_qkv`` holding query group ``group`` (its q heads, k and v)."""
    block = (heads_per_group(cfg) + 2) * cfg.head_dim
    return torch.arange(group * block, (group + 1) * block)


def qkv_head_rows(cfg: ModelConfig, head: int) -> torch.Tensor:
    """Rows of ``linear_qkv`` holding query head ``head`` (global head index)."""
    per, d = heads_per_group(cfg), cfg.head_dim
    g, j = divmod(head, per)
    start = g * (per + 2) * d + j * d
    return torch.arange(start, start + d)


def qkv_kv_rows(cfg: ModelConfig, group: int) -> torch.Tensor:
    """Rows of ``linear_qkv`` holding the key and value of query group ``group``."""
    per, d = heads_per_group(cfg), cfg.head_dim
    start = group * (per + 2) * d + per * d
    return torch.arange(start, start + 2 * d)


def qkv_rows(cfg: ModelConfig, groups: list[int], heads: list[list[int]]) -> torch.Tensor:
    """Rows of the kept ``linear_qkv``: for every kept group (in order) its kept query heads
    (global indices) then its key and value -- the layout of the smaller model."""
    rows = []
    for g, hs in zip(groups, heads):
        rows += [qkv_head_rows(cfg, h) for h in hs]
        rows.append(qkv_kv_rows(cfg, g))
    return torch.cat(rows)


def qkv_views(qkv: torch.Tensor, cfg: ModelConfig
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k and v rows of a full ``linear_qkv`` weight or bias as views (no copy), each
    ``[groups, rows of the group, *rest]``; ``view.reshape(-1, *rest)`` is ``split_qkv``'s."""
    g, d, per = cfg.query_groups, cfg.head_dim, heads_per_group(cfg)
    blocks = qkv.reshape(g, (per + 2) * d, *qkv.shape[1:])
    q, k, v = blocks.split([per * d, d, d], dim=1)
    return q, k, v


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full ``linear_qkv`` weight ``[rows, hidden]`` or bias ``[rows]`` -> ``(q, k, v)`` with
    heads in order (``q``: ``[heads * kv_channels, ...]``, ``k``/``v``: ``[groups *
    kv_channels, ...]``), the layout of separate q/k/v projections."""
    rest = qkv.shape[1:]
    return tuple(t.reshape(-1, *rest).contiguous()  # type: ignore[return-value]
                 for t in qkv_views(qkv, cfg))


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             cfg: ModelConfig) -> torch.Tensor:
    """Inverse of ``split_qkv``."""
    g, d = cfg.query_groups, cfg.head_dim
    rest = q.shape[1:]
    blocks = [q.reshape(g, -1, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)]
    return torch.cat(blocks, dim=1).reshape(-1, *rest)


# ---- SwiGLU fc1 -------------------------------------------------------------------------------

def gated(cfg: ModelConfig) -> bool:
    """``linear_fc1`` is the fused ``[gate; up]`` of SwiGLU."""
    return cfg.activation == "swiglu"


def fc1_views(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate, up)`` halves of a SwiGLU ``linear_fc1`` as views (no copy)."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU ``linear_fc1`` weight or bias (full, or one TP rank's shard) -> ``(gate, up)``."""
    gate, up = fc1_views(fc1)
    return gate.contiguous(), up.contiguous()


def join_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Inverse of ``split_fc1``."""
    return torch.cat([gate, up], dim=0)


def is_fc1(name: str) -> bool:
    """``name`` (a state-dict key or layer-local name) is the weight or bias of an MLP's
    ``linear_fc1``: the dense MLP's, a routed expert's (``mlp.experts.local_experts.<e>.``) or
    the shared expert's (``mlp.shared_experts.``); all three are ``[gate; up]`` under SwiGLU,
    split per TP rank alike (not a norm fused into it: ``layer_norm_weight``)."""
    return name.endswith(_ANY_FC1)


EXPERT_PREFIX = "mlp.experts.local_experts."
"""Layer-local prefix of a routed expert's tensors (megatron-core's ``SequentialMLP``): the
index after it is the expert's local index on its expert-parallel rank."""


def split_expert(name: str) -> tuple[int, str] | None:
    """``(expert index, name within the expert)`` of a routed expert's layer-local tensor
    ``name``; None for any other tensor."""
    if not name.startswith(EXPERT_PREFIX):
        return None
    e, _, rest = name[len(EXPERT_PREFIX):].partition(".")
    return int(e), rest


def fc1_rows(cfg: ModelConfig, neurons: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Rows of ``linear_fc1`` feeding the given MLP neurons (both halves under SwiGLU) of an
    MLP of ``size`` neurons (None: the dense ``ffn_hidden_size``; an expert's is another)."""
    size = cfg.ffn_hidden_size if size is None else size
    return torch.cat([neurons, neurons + size]) if gated(cfg) else neurons


def fc1_tp_shard(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """TP rank ``rank``'s shard ``[gate_r; up_r]`` of a full SwiGLU ``linear_fc1``."""
    gate, up = full.chunk(2, dim=0)
    return join_fc1(gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank])


def fc1_from_tp_shards(shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``fc1_tp_shard``: the full SwiGLU ``linear_fc1`` from every rank's shard."""
    halves = [s.chunk(2, dim=0) for s in shards]
    return join_fc1(torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves]))


# ---- linear_proj ------------------------------------------------------------------------------

def proj_head_cols(cfg: ModelConfig, heads: list[int]) -> torch.Tensor:
    """Columns of ``linear_proj`` reading the outputs of the given heads (in that order)."""
    d = cfg.head_dim
    return torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[..., heads * kv_channels]`` -> ``[..., heads, kv_channels]``: the input of
    ``linear_proj`` (the attention output, heads in order; this rank's heads under TP)."""
    return x.view(*x.shape[:-1], -1, head_dim)


def proj_per_head(proj: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """``linear_proj`` weight ``[hidden, heads * kv_channels]`` -> ``[hidden, heads,
    kv_channels]``."""
    return split_heads(proj, cfg.head_dim)


# ---- split / join a fused tensor by name (conversion, merging) --------------------------------

def split_fused(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A full layer-local tensor -> its logical parts: ``linear_qkv`` into ``q``/``k``/``v``,
    SwiGLU ``linear_fc1`` into ``gate``/``up``; any other tensor is its own single part
    ``{"": tensor}``."""
    if name in QKV:
        return dict(zip("qkv", split_qkv(tensor, cfg)))
    if name in FC1 and gated(cfg):
        return dict(zip(("gate", "up"), split_fc1(tensor)))
    return {"": tensor}


def join_fused(name: str, parts: dict[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Inverse of ``split_fused``."""
    if name in QKV:
        return join_qkv(parts["q"], parts["k"], parts["v"], cfg)
    if name in FC1 and gated(cfg):
        return join_fc1(parts["gate"], parts["up"])
    return parts[""]


# ---- vocabulary -------------------------------------------------------------------------------

def vocab_range(per_rank: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of the vocabulary held by TP rank ``rank`` when each holds
    ``per_rank`` rows of the embedding / columns of the logits."""
    return rank * per_rank, (rank + 1) * per_rank


def drop_vocab_padding(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The first ``vocab`` logit columns of full-vocabulary (TP=1) logits: the padded entries
    beyond the tokenizer's vocabulary dropped."""
    return logits[..., :vocab]

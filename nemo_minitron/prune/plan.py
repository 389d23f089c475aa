"""From a pruning target and importance scores to a ``PrunePlan``: the kept indices of every
axis and the smaller model's config. Pure tensor logic; no model, no collectives.

Pruning is homogeneous (every layer keeps the same counts) but each layer keeps its own best
units. With GQA, kept query groups are the best groups of the layer and, inside each kept
group, the best heads (heads are ranked inside their group). Kept indices are sorted so the
surviving units keep their original order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch

from nemo_minitron.config import ConfigError, ModelConfig, check_divisible, layout_divisor
from nemo_minitron.config.hetero import LayerShape
from nemo_minitron.importance.layers import block_angular_distance
from nemo_minitron.importance.scores import Scores, keep_best
from nemo_minitron.model.layouts import group_heads, heads_by_group
from nemo_minitron.prune.hetero import check_layer_target, regroup
from nemo_minitron.prune.moe import ChannelSelection, ExpertMetric, check_moe_scores, plan_moe
from nemo_minitron.utils.logging import get_logger, warn_once

log = get_logger("prune")


@dataclass(kw_only=True)
class Target:
    """The pruned shape; None keeps an axis as it is."""

    num_layers: int | None = None
    """Layers to keep (the best contiguous-or-not set by Block Importance, see drop_layers)."""
    hidden_size: int | None = None
    """Embedding channels to keep."""
    ffn_hidden_size: int | None = None
    """MLP neurons to keep per layer."""
    num_attention_heads: int | None = None
    """Query heads to keep per layer."""
    num_query_groups: int | None = None
    """KV groups to keep per layer."""
    num_moe_experts: int | None = None
    """Routed experts to keep per MoE layer (router rows and experts removed; must stay at least
    ``model.moe_router_topk`` and divide by the expert-parallel size)."""
    moe_ffn_hidden_size: int | None = None
    """Channels to keep in every routed expert (which ones: ``moe_ffn_selection``)."""
    moe_shared_expert_intermediate_size: int | None = None
    """Channels to keep in the shared expert of every MoE layer."""
    expert_metric: ExpertMetric = "output_norm"
    """How num_moe_experts ranks experts: ``output_norm``, the token mean L2 norm of each
    expert's router-weighted output (``Scores.experts``), or ``router_mass``, the router's
    probability mass (``Scores.expert_mass``)."""
    moe_ffn_selection: ChannelSelection = "shared"
    """Which channels moe_ffn_hidden_size keeps: ``shared``, one index set per layer for all
    its experts (``Scores.expert_ffn``; Model Optimizer's rule), or ``per_expert``, each expert
    its own best channels (``Scores.expert_channels``); either way every expert keeps one
    shape."""
    drop_layers: list[int] | None = None
    """Explicit 0-based layer indices to remove (overrides the score-based choice)."""
    layer_metric: Literal["block_importance", "lm_loss", "angular_distance"] = "block_importance"
    """How num_layers picks the layers to remove: lowest Block Importance layers, the
    contiguous block whose removal raises the validation LM loss least, or the contiguous block
    whose input and output hidden states are closest by angular distance (arXiv 2410.09982)."""
    hardware_multiple: int = 64
    """Width targets that are not multiples of this are accepted with a warning."""
    layer_shapes: list[LayerShape] | None = None
    """Per-layer shapes (a heterogeneous model, ``prune.hetero``): each layer's attention and
    MLP full (with its own ``num_query_groups`` / ``ffn_hidden_size``), linear or no-op; the
    other axes are then left as they are."""


@dataclass
class PrunePlan:
    """Kept indices per axis (into the source model) and the pruned config."""

    source: ModelConfig
    """Config of the source model."""
    config: ModelConfig
    """Config of the pruned model (``kv_channels`` always explicit)."""
    kept_layers: list[int]
    """Kept source layers, 0-based, in order."""
    kept_hidden: torch.Tensor
    """Kept embedding channels ``[hidden_size']``."""
    kept_ffn: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per kept source layer: kept MLP neurons ``[ffn_hidden_size']``."""
    kept_groups: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per kept source layer: kept query groups ``[num_query_groups']``."""
    kept_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per kept source layer: kept heads ``[num_query_groups', heads per group']`` (global
    head ids)."""
    kept_experts: dict[int, torch.Tensor] = field(default_factory=dict)
    """MoE, per kept source layer: kept routed experts ``[num_moe_experts']`` (source
    indices; the pruned layer's expert ``j`` is ``kept_experts[layer][j]``)."""
    kept_expert_ffn: dict[int, torch.Tensor] = field(default_factory=dict)
    """MoE, per kept source layer: kept channels of the routed experts, ``[moe_ffn_hidden_size']``
    (one index set for all experts of the layer) or ``[num_moe_experts, moe_ffn_hidden_size']``
    (``Target.moe_ffn_selection=per_expert``: row ``e`` for source expert ``e``)."""
    kept_shared_ffn: dict[int, torch.Tensor] = field(default_factory=dict)
    """MoE with a shared expert, per kept source layer: its kept channels
    ``[moe_shared_expert_intermediate_size']``."""
    expert_metric: ExpertMetric = "output_norm"
    """What ranked the kept experts (``Target.expert_metric``)."""
    moe_ffn_selection: ChannelSelection = "shared"
    """How the kept expert channels were chosen (``Target.moe_ffn_selection``)."""
    rescale_norms: bool = True
    """Compensate RMSNorm for the removed channels (see ``prune.apply``)."""
    fingerprint: list[float] | None = None
    """``weights_fingerprint`` of the model the scores were computed on (``Scores.meta``); the
    prune refuses another model's weights. None: not known (older or foreign scores)."""
    linear: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Fitted weights of the linear blocks of a heterogeneous plan, by
    ``prune.hetero.linear_key`` (``prune.hetero.fit_linear_blocks``)."""
    trained: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Per source layer: its cut MLP's tensors after blockwise local distillation, used
    instead of the sliced ones (``prune.hetero.distill_mlp_blocks``)."""


def target_heads(src: ModelConfig, t: Target) -> tuple[int, int]:
    """Pruned ``(num_attention_heads, num_query_groups)``. Pruning groups alone removes whole
    groups with their heads; pruning heads of an MHA model removes their groups too."""
    a, g = src.num_attention_heads, src.query_groups
    if t.num_attention_heads is None:
        new_g = t.num_query_groups or g
        return new_g * (a // g), new_g
    if t.num_query_groups is None:
        return t.num_attention_heads, t.num_attention_heads if g == a else g
    return t.num_attention_heads, t.num_query_groups


def kept_layer_count(src: ModelConfig, t: Target) -> int:
    """Layers the pruned model keeps (explicit ``drop_layers`` win over ``num_layers``)."""
    if t.drop_layers is not None:
        return src.num_layers - len(set(t.drop_layers))
    return t.num_layers or src.num_layers


def rescales_norms(src: ModelConfig, rescale_norms: bool = True) -> bool:
    """Whether pruning compensates the norms for removed channels (RMSNorm only)."""
    return rescale_norms and src.normalization == "RMSNorm"


def pruned_config(src: ModelConfig, t: Target, rescale_norms: bool = True) -> ModelConfig:
    """The config of ``src`` pruned to ``t``: the one derivation of the pruned shape (head
    dimension kept, explicit ``kv_channels``; the norm epsilon scaled when norms are rescaled,
    see ``prune.apply``)."""
    new_a, new_g = target_heads(src, t)
    hidden = t.hidden_size or src.hidden_size
    # RMSNorm rescaling multiplies the weights by sqrt(H/H'); scaling epsilon by H/H' makes
    # the compensation exact: sqrt(S/H' + eps*H/H') = sqrt(H/H') * sqrt(S/H + eps).
    eps = src.layernorm_epsilon * (src.hidden_size / hidden
                                   if rescales_norms(src, rescale_norms) else 1.0)
    return dataclasses.replace(
        src, num_layers=kept_layer_count(src, t), hidden_size=hidden,
        ffn_hidden_size=t.ffn_hidden_size or src.ffn_hidden_size, num_attention_heads=new_a,
        num_query_groups=new_g, kv_channels=src.head_dim, layernorm_epsilon=eps,
        layer_shapes=[dataclasses.replace(x) for x in t.layer_shapes] if t.layer_shapes else None,
        **_moe_target(src, t))


MOE_AXES = ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
"""Target fields that only an MoE source has."""


def _moe_target(src: ModelConfig, t: Target) -> dict[str, int | None]:
    """The pruned MoE fields (``moe_ffn_hidden_size`` always explicit for an MoE source)."""
    if not src.is_moe:
        return {}
    return {"num_moe_experts": t.num_moe_experts or src.num_moe_experts,
            "moe_ffn_hidden_size": t.moe_ffn_hidden_size or src.expert_ffn_hidden_size,
            "moe_shared_expert_intermediate_size": (t.moe_shared_expert_intermediate_size
                                                    or src.moe_shared_expert_intermediate_size)}


def _source_size(src: ModelConfig, name: str) -> int | None:
    """The source's size of target axis ``name`` (None: the source has no such axis)."""
    if name == "num_query_groups":
        return src.query_groups
    if name == "moe_ffn_hidden_size":
        return src.expert_ffn_hidden_size if src.is_moe else None
    return getattr(src, name)


def validate_target(src: ModelConfig, t: Target, tp: int = 1, pp: int = 1,
                    ep: int = 1) -> None:
    """One-line errors for impossible targets (``tp``/``pp``/``ep``: the layout the pruned
    model is built under); warnings for unfriendly sizes."""
    if t.layer_shapes is not None:
        _validate_layer_target(src, t, tp)
    a, g = src.num_attention_heads, src.query_groups
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", *MOE_AXES):
        value = getattr(t, name)
        if value is None:
            continue
        have = _source_size(src, name)
        if have is None:
            raise ConfigError(f"target.{name}={value}: the source model has no "
                              f"{'routed experts' if not src.is_moe else 'shared expert'} "
                              f"(model.{'num_moe_experts' if not src.is_moe else name} is "
                              f"not set)")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"target.{name}={value!r} must be a positive integer")
        if value > have:
            raise ConfigError(f"target.{name}={value} is larger than the source's {have}")
    if t.moe_ffn_selection not in ("shared", "per_expert"):
        raise ConfigError(f"target.moe_ffn_selection={t.moe_ffn_selection!r} must be shared or "
                          "per_expert")
    if t.moe_ffn_selection != "shared" and not src.is_moe:
        raise ConfigError(f"target.moe_ffn_selection={t.moe_ffn_selection}: the source model has "
                          "no routed experts (model.num_moe_experts is not set)")
    if src.is_moe and t.ffn_hidden_size is not None:
        raise ConfigError(f"target.ffn_hidden_size={t.ffn_hidden_size}: an MoE model has no "
                          f"dense MLP (target.moe_ffn_hidden_size prunes its experts' channels)")
    new_a, new_g = target_heads(src, t)
    if new_a % new_g:
        raise ConfigError(f"target.num_attention_heads={new_a} is not divisible by "
                          f"target.num_query_groups={new_g}")
    if new_a // new_g > a // g:
        raise ConfigError(f"target keeps {new_a // new_g} heads per query group; the source "
                          f"has only {a // g}")
    check_divisible({"num_attention_heads": new_a, "num_query_groups": new_g,
                     "ffn_hidden_size": t.ffn_hidden_size,
                     "moe_ffn_hidden_size": t.moe_ffn_hidden_size,
                     "moe_shared_expert_intermediate_size":
                         t.moe_shared_expert_intermediate_size}, tp, pp, "target.")
    if t.num_moe_experts is not None:
        if t.num_moe_experts < src.moe_router_topk:
            raise ConfigError(f"target.num_moe_experts={t.num_moe_experts} is below "
                              f"model.moe_router_topk={src.moe_router_topk} (every token is "
                              f"routed to that many experts)")
        if t.num_moe_experts % ep:
            raise ConfigError(f"target.num_moe_experts={t.num_moe_experts} is not divisible by "
                              f"parallel.expert_model_parallel_size={ep}")
    if t.drop_layers is not None:
        bad = [i for i in t.drop_layers if not 0 <= i < src.num_layers]
        if bad:
            raise ConfigError(f"target.drop_layers names layer {bad[0]}, but the source has "
                              f"layers 0..{src.num_layers - 1}")
        if len(set(t.drop_layers)) >= src.num_layers:
            raise ConfigError("target.drop_layers removes every layer")
    kept = kept_layer_count(src, t)
    if kept % layout_divisor("num_layers", tp, pp):
        raise ConfigError(f"the pruned model keeps {kept} layers, not divisible by "
                          f"parallel.pipeline_model_parallel_size={pp}")
    m = t.hardware_multiple
    for name in ("hidden_size", "ffn_hidden_size"):
        value = getattr(t, name)
        if value is not None and value % m:
            near = [x for x in (value // m * m, value // m * m + m) if 0 < x <= getattr(src, name)]
            warn_once(log, f"target.{name}={value} is not a multiple of {m}: the pruned model "
                      f"works, but GPU matrix products run slower at such widths"
                      f"{' (' + ' or '.join(map(str, near)) + ' would not)' if near else ''}; "
                      f"target.hardware_multiple sets the multiple")


def _validate_layer_target(src: ModelConfig, t: Target, tp: int) -> None:
    others = [name for name in ("num_layers", "hidden_size", "ffn_hidden_size",
                                "num_attention_heads", "num_query_groups", "drop_layers",
                                *MOE_AXES) if getattr(t, name) is not None]
    if others:
        raise ConfigError(f"target.layer_shapes with target.{others[0]}: a per-layer target "
                          f"sets every layer's sizes itself (the other axes are not pruned)")
    check_layer_target(src, t.layer_shapes, tp)


def make_plan(src: ModelConfig, scores: Scores, t: Target, tp: int = 1, pp: int = 1,
              rescale_norms: bool = True, ep: int = 1) -> PrunePlan:
    """Choose the kept units of every axis (``tp``/``pp``/``ep``: the layout the pruned model
    is built under)."""
    validate_target(src, t, tp, pp, ep)
    check_scores(src, scores, t)
    L, G = src.num_layers, src.query_groups
    if t.drop_layers is not None:
        layers = [i for i in range(L) if i not in set(t.drop_layers)]
    elif t.num_layers is not None and t.layer_metric == "angular_distance":
        start, block = angular_block(scores, L - t.num_layers)
        layers = [i for i in range(L) if not start <= i < start + block]
    elif t.num_layers is not None:
        layers = keep_best(scores.layers, t.num_layers).tolist()
    else:
        layers = list(range(L))
    config = pruned_config(src, t, rescale_norms)
    new_a, new_g = config.num_attention_heads, config.query_groups
    new_per_group = new_a // new_g
    plan = PrunePlan(source=src, config=config, kept_layers=layers,
                     kept_hidden=keep_best(scores.hidden, config.hidden_size),
                     rescale_norms=rescales_norms(src, rescale_norms),
                     expert_metric=t.expert_metric, moe_ffn_selection=t.moe_ffn_selection,
                     fingerprint=scores.meta.get("fingerprint"))
    if src.is_moe:
        plan.kept_experts, plan.kept_expert_ffn, plan.kept_shared_ffn = plan_moe(
            src, config, scores, layers, t.expert_metric, t.moe_ffn_selection)
    for new_i, i in enumerate(layers):
        # A heterogeneous layer has its own sizes, and no units where a block is not full.
        shape, one = config.layer_shape(new_i), config.layer_config(new_i)
        if shape.mlp == "full" and not src.is_moe:  # an MoE layer has no dense MLP
            plan.kept_ffn[i] = keep_best(scores.ffn[i], one.ffn_hidden_size)
        if shape.attention != "full":
            continue
        groups = keep_best(scores.groups[i], one.query_groups)
        plan.kept_groups[i] = groups
        if config.is_heterogeneous:  # every head kept, regrouped (prune.hetero)
            plan.kept_heads[i] = regroup(src, groups.tolist())
            continue
        head_scores = heads_by_group(scores.heads[i], G)
        plan.kept_heads[i] = torch.stack([
            group_heads(src, g)[keep_best(head_scores[g], new_per_group)] for g in groups.tolist()])
    return plan


def angular_block(scores: Scores, block: int) -> tuple[int, int]:
    """``(start, block)``: the contiguous block of ``block`` layers with the smallest angular
    distance between the hidden states entering and leaving it (ties: the earliest)."""
    if scores.angular_distance is None:
        raise ConfigError("target.layer_metric=angular_distance needs activation scores with "
                          "angular distances (importance=activation; recompute old scores)")
    if block == 0:
        return 0, 0
    return int(torch.argmin(block_angular_distance(scores.angular_distance, block))), block


def check_scores(src: ModelConfig, s: Scores, t: Target) -> None:
    """One-line error unless ``s`` has the shape of ``src``'s scores (every axis ``t`` needs:
    an MoE source's expert scores by ``t.expert_metric``)."""
    if src.is_moe:
        check_moe_scores(src, s, t.expert_metric, t.moe_ffn_selection)
    want = {"ffn": (src.num_layers, 0 if src.is_moe else src.ffn_hidden_size),
            "heads": (src.num_layers, src.num_attention_heads),
            "groups": (src.num_layers, src.query_groups),
            "hidden": (src.hidden_size,), "layers": (src.num_layers,)}
    if s.angular_distance is not None:
        want["angular_distance"] = (src.num_layers + 1, src.num_layers + 1)
    for axis, shape in want.items():
        if tuple(getattr(s, axis).shape) != shape:
            raise ConfigError(f"scores were computed on a different model: {axis} scores have "
                              f"shape {tuple(getattr(s, axis).shape)}, the model needs {shape}")

"""Pruning mixture-of-experts layers (megatron-core's ``MoELayer`` with per-expert
``SequentialMLP`` experts): the MoE part of the plan and the slicing rules of its weights.

The plan, per kept layer: the kept routed experts (the best by ``target.expert_metric``:
``Scores.experts``, the router-weighted output norm, or ``Scores.expert_mass``, the router's
probability mass), the kept expert channels and the kept shared-expert channels
(``Scores.shared_expert_ffn``). Expert channels by ``target.moe_ffn_selection``: ``shared``,
one index set for every expert of the layer (``Scores.expert_ffn``; Model Optimizer's rule, one
slice of a grouped-GEMM weight), or ``per_expert``, each expert its own best channels
(``Scores.expert_channels``; the same count, so every expert keeps one shape).

The weights (layer-local names, full TP=1 tensors):

- ``mlp.router.weight [experts, hidden]``: the kept experts' rows, the kept hidden columns;
- ``mlp.experts.local_experts.<e>.linear_fc1.weight [2f, hidden]`` (SwiGLU ``[gate; up]``): the
  kept channels' rows of both halves (the layer's, or this expert's own), the kept hidden
  columns; ``linear_fc2.weight [hidden, f]``: the kept hidden rows, the kept channel columns.
  A kept expert is renumbered by its rank among the kept ones (``expert_name``); a removed one
  has no counterpart;
- ``mlp.shared_experts.linear_fc1/linear_fc2``: as an expert, with the shared channels;
  ``mlp.shared_experts.gate_weight [1, hidden]`` (Qwen2-MoE's sigmoid gate): the hidden columns.

Removing experts the router never picks leaves the outputs unchanged with a router that takes
the top-k logits and a softmax over them (Mixtral, Qwen-MoE with ``norm_topk_prob``); with a
pre-softmax router (``moe_router_pre_softmax``) the softmax runs over every expert, so the kept
weights change unless the removed experts' probabilities were negligible.

Under expert parallelism ``local_experts.<e>`` is an EP rank's local index; ``model.stream``
hands these rules global expert numbers and moves each kept expert to the EP rank that holds it.
"""

from __future__ import annotations

from typing import Literal

import torch

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.importance.scores import Scores, keep_best
from nemo_minitron.model.layouts import EXPERT_PREFIX, fc1_rows, split_expert

ExpertMetric = Literal["output_norm", "router_mass"]
ChannelSelection = Literal["shared", "per_expert"]
EXPERT_SCORES = {"output_norm": "experts", "router_mass": "expert_mass"}
"""``target.expert_metric`` -> the ``Scores`` field that ranks experts."""

ROUTER = "mlp.router.weight"
SHARED = "mlp.shared_experts."
_MLP = ("linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias")
SHARED_TENSORS = (*(SHARED + n for n in _MLP), SHARED + "gate_weight")
"""Layer-local names of the shared expert's tensors."""


def _expert(name: str) -> tuple[int, str] | None:
    """``(expert, tensor)`` of a routed expert's linear weight or bias (``layouts``' names)."""
    parsed = split_expert(name)
    return parsed if parsed is not None and parsed[1] in _MLP else None


def is_moe_tensor(name: str) -> bool:
    """``name`` (layer-local) is a tensor of an MoE layer that pruning knows how to slice."""
    return name == ROUTER or name in SHARED_TENSORS or _expert(name) is not None


def expert_name(name: str, kept: list[int]) -> str | None:
    """The pruned layer's name of the source layer's ``name``: a kept expert's tensor
    renumbered by the expert's rank in ``kept``, None for a removed expert's, ``name`` else."""
    parsed = _expert(name)
    if parsed is None:
        return name
    e, tensor = parsed
    return f"{EXPERT_PREFIX}{kept.index(e)}.{tensor}" if e in kept else None


def check_moe_scores(src: ModelConfig, s: Scores, metric: ExpertMetric,
                     selection: ChannelSelection = "shared") -> None:
    """One-line error unless ``s`` holds the MoE scores of ``src``'s shape (scores of a dense
    model, or of another MoE, used on this one) that ``metric`` and ``selection`` need."""
    L, E, F = src.num_layers, src.num_moe_experts, src.expert_ffn_hidden_size
    want = {EXPERT_SCORES[metric]: (L, E), "expert_ffn": (L, F)}
    if selection == "per_expert":
        want["expert_channels"] = (L, E, F)
    if src.moe_shared_expert_intermediate_size:
        want["shared_expert_ffn"] = (L, src.moe_shared_expert_intermediate_size)
    for axis, shape in want.items():
        have = getattr(s, axis)
        if have is None:
            raise ConfigError(f"the scores have no {axis} scores, which pruning this MoE model "
                              f"needs (shape {shape}): they were computed on a dense model or "
                              f"without them; estimate the importance on this model")
        if tuple(have.shape) != shape:
            raise ConfigError(f"scores were computed on a different model: {axis} scores have "
                              f"shape {tuple(have.shape)}, the model needs {shape}")


def plan_moe(src: ModelConfig, new: ModelConfig, s: Scores, layers: list[int],
             metric: ExpertMetric, selection: ChannelSelection = "shared"
             ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per kept layer: ``(kept experts, kept expert channels, kept shared-expert channels)``
    of the MoE source ``src`` pruned to ``new`` (scores checked by ``check_moe_scores``). The
    expert channels are ``[f']`` (``shared``) or ``[source experts, f']`` (``per_expert``: row
    ``e`` is source expert ``e``'s)."""
    ranking = getattr(s, EXPERT_SCORES[metric])
    experts, ffn, shared = {}, {}, {}
    f = new.expert_ffn_hidden_size
    for i in layers:
        experts[i] = keep_best(ranking[i], new.num_moe_experts or 0)
        ffn[i] = torch.stack([keep_best(c, f) for c in s.expert_channels[i]]) \
            if selection == "per_expert" else keep_best(s.expert_ffn[i], f)
        if src.moe_shared_expert_intermediate_size:
            shared[i] = keep_best(s.shared_expert_ffn[i],
                                  new.moe_shared_expert_intermediate_size or 0)
    return experts, ffn, shared


def slice_moe(name: str, w: torch.Tensor, src: ModelConfig, hid: torch.Tensor,
              experts: torch.Tensor, ffn: torch.Tensor,
              shared: torch.Tensor | None) -> torch.Tensor:
    """The pruned full tensor of the MoE tensor ``name`` (``is_moe_tensor``) of one layer:
    ``hid`` the kept hidden channels, ``experts`` the kept experts, ``ffn`` and ``shared`` the
    kept channels of the experts (``plan_moe``'s: one set, or one row per source expert) and
    of the shared expert."""
    if name == ROUTER:
        return w[experts][:, hid]
    if name == SHARED + "gate_weight":
        return w[:, hid]
    parsed = _expert(name)
    if parsed is not None:
        keep = ffn[parsed[0]] if ffn.dim() == 2 else ffn
        part, size = parsed[1], src.expert_ffn_hidden_size
    else:
        assert shared is not None and src.moe_shared_expert_intermediate_size
        part, keep, size = name[len(SHARED):], shared, src.moe_shared_expert_intermediate_size
    if part.startswith("linear_fc1"):
        rows = fc1_rows(src, keep, size)
        return w[rows][:, hid] if w.dim() == 2 else w[rows]
    return w[hid][:, keep] if w.dim() == 2 else w[hid]

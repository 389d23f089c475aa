"""Candidate pruned shapes near a parameter budget.

Every axis takes the values that are multiples of its step between the source size times
(1 - max prune ratio) and the source size (the source size itself included). Heads go by query
groups: each candidate keeps ``g'`` groups and, with ``proportional_heads``, the source's heads per
group (else every heads-per-group count up to the source's). A mixture-of-experts source varies
its routed experts (never below ``moe_router_topk``) and their width instead of
``ffn_hidden_size``, which its MoE layers do not use. The exact parameter count of each
combination (``count_params``, equal to the built model's), total or active (``budget``),
decides which lie within the budget.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from nemo_minitron.config import ConfigError, ModelConfig, layout_divisor
from nemo_minitron.model.params import count_params
from nemo_minitron.prune.plan import Target, pruned_config
from nemo_minitron.search.blocks import BlockLibrary, MemoryBudget


@dataclass(kw_only=True)
class SearchConfig:
    """The budget, the grid of candidate shapes and the retraining of each candidate."""

    target_params: int | None = None
    """Parameter budget of the pruned model (required)."""
    mode: Literal["uniform", "heterogeneous"] = "uniform"
    """uniform: every layer the same shape, candidates from the grid below, each retrained;
    heterogeneous: one block per layer from ``blocks``, chosen under the budget by an exact
    solver from each block's score on the source (``search.hetero``), then retrained."""
    blocks: BlockLibrary = field(default_factory=BlockLibrary)
    """The block library of every layer (mode heterogeneous)."""
    budget: Literal["total", "active", "memory"] = "total"
    """What the search bounds: total parameters (target_params), active parameters
    (target_params counts only what one token runs: an MoE layer's moe_router_topk experts, not
    all; the same as total for a dense model; removing experts lowers the total count only), or
    the inference memory, weights plus KV cache (``memory``; mode heterogeneous)."""
    memory: MemoryBudget = field(default_factory=MemoryBudget)
    """The memory budget and the batch and context it is measured at (budget memory)."""
    tolerance: float = 0.05
    """Candidates lie within target_params * (1 +- tolerance)."""
    retrain_steps: int = 100
    """Distillation steps per candidate before the final ranking."""
    num_layers_step: int = 1
    """Candidate num_layers are multiples of this."""
    hidden_size_step: int = 64
    """Candidate hidden_size values are multiples of this."""
    ffn_hidden_size_step: int = 64
    """Candidate ffn_hidden_size values are multiples of this."""
    num_query_groups_step: int = 1
    """Candidate num_query_groups values are multiples of this."""
    max_num_layers_prune: float = 0.5
    """Largest fraction of the layers a candidate removes."""
    max_hidden_size_prune: float = 0.5
    """Largest fraction of hidden_size a candidate removes."""
    max_ffn_hidden_size_prune: float = 0.5
    """Largest fraction of ffn_hidden_size a candidate removes."""
    max_num_attention_heads_prune: float = 0.5
    """Largest fraction of the attention heads (and of the query groups) a candidate removes."""
    num_moe_experts_step: int = 1
    """MoE source: candidate num_moe_experts values are multiples of this."""
    moe_ffn_hidden_size_step: int = 64
    """MoE source: candidate moe_ffn_hidden_size values (every routed expert's width) are
    multiples of this."""
    max_num_moe_experts_prune: float = 0.5
    """MoE source: largest fraction of the routed experts a candidate removes."""
    max_moe_ffn_hidden_size_prune: float = 0.5
    """MoE source: largest fraction of moe_ffn_hidden_size a candidate removes."""
    proportional_heads: bool = True
    """Keep the source's heads per query group (prune whole groups); false also tries fewer
    heads per group."""
    max_candidates: int = 8
    """Keep at most this many candidates, those closest to target_params."""
    candidates: list[str] | None = None
    """Retrain only these candidates (names as logged, e.g. ``L3-H64-F64-A4-G2``) in this run,
    e.g. one per job; the run that finds every candidate finished ranks them. ``[]`` retrains
    nothing and only ranks (an error while a candidate is unfinished)."""
    fan_out: bool = False
    """For ``launch`` (SLURM): submit one job per candidate (``search.candidates=[NAME]``, all
    writing into the stage's directory) and a ranking job (``search.candidates=[]``) after them;
    false runs the whole search as one job. The search verb itself ignores it."""
    max_candidates_per_run: int | None = None
    """Stop after retraining this many candidates in this run (time-sliced jobs); a re-run
    continues with the next."""
    score_fn: str | None = None
    """``module:function`` called with a retrained candidate's checkpoint path, returning a float
    (lower is better) that ranks the candidates instead of the validation LM loss."""
    layer_metric: Literal["block_importance", "lm_loss", "angular_distance"] = "block_importance"
    """How depth pruning picks layers: block_importance, lm_loss or angular_distance (see
    target.layer_metric)."""
    teacher_cache: bool = False
    """Run the teacher once: store its top-k log-probabilities of the retraining data in
    ``OUT/search/teacher_cache`` and distill every candidate from there (forward KL on the top-k
    plus a tail bucket; needs the logit loss alone at T=1, see ``kd.teacher_cache``)."""
    teacher_cache_top_k: int = 64
    """Tokens per position in the teacher cache."""

    DEPRECATED_KEYS: ClassVar[dict[str, str]] = {
        "layers_step": "num_layers_step", "hidden_step": "hidden_size_step",
        "ffn_step": "ffn_hidden_size_step", "groups_step": "num_query_groups_step",
        "max_layers_prune": "max_num_layers_prune", "max_hidden_prune": "max_hidden_size_prune",
        "max_ffn_prune": "max_ffn_hidden_size_prune",
        "max_heads_prune": "max_num_attention_heads_prune"}
    """Old recipe keys still read (with a warning) under their Megatron names."""

    def __post_init__(self) -> None:
        if self.target_params is not None and self.target_params <= 0:
            raise ConfigError(f"search.target_params={self.target_params} must be > 0")
        if not 0 <= self.tolerance < 1:
            raise ConfigError(f"search.tolerance={self.tolerance} must be in [0, 1)")
        for name in ("retrain_steps", "num_layers_step", "hidden_size_step",
                     "ffn_hidden_size_step", "num_query_groups_step", "max_candidates",
                     "teacher_cache_top_k", "num_moe_experts_step",
                     "moe_ffn_hidden_size_step"):
            if getattr(self, name) < 1:
                raise ConfigError(f"search.{name}={getattr(self, name)} must be >= 1")
        for name in ("max_num_layers_prune", "max_hidden_size_prune",
                     "max_ffn_hidden_size_prune", "max_num_attention_heads_prune",
                     "max_num_moe_experts_prune", "max_moe_ffn_hidden_size_prune"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"search.{name}={getattr(self, name)} must be in [0, 1)")
        if self.mode == "heterogeneous" and (self.fan_out or self.candidates is not None):
            raise ConfigError("search.fan_out and search.candidates select uniform candidates; "
                              "search.mode=heterogeneous has one (the solver's choice)")
        if self.max_candidates_per_run is not None and self.max_candidates_per_run < 1:
            raise ConfigError(f"search.max_candidates_per_run={self.max_candidates_per_run} "
                              "must be >= 1")
        if self.budget not in ("total", "active", "memory"):
            raise ConfigError(f"search.budget={self.budget!r} must be total, active or memory")
        if self.budget == "memory" and self.mode != "heterogeneous":
            raise ConfigError("search.budget=memory needs search.mode=heterogeneous (a uniform "
                              "search bounds total or active parameters)")


@dataclass(frozen=True)
class Candidate:
    """One pruned shape and its exact parameter counts (an MoE shape: its experts and their
    width, the source's ``ffn_hidden_size``)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    params: int
    num_moe_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    active_params: int | None = None
    """Parameters one token runs (``count_params(active=True)``); None: ``params`` (dense)."""

    @property
    def name(self) -> str:
        """Directory-safe id, e.g. ``L3-H48-F96-A4-G2``; MoE ``L3-H48-E6-EF32-A4-G2``."""
        mlp = f"F{self.ffn_hidden_size}" if self.num_moe_experts is None else \
            f"E{self.num_moe_experts}-EF{self.moe_ffn_hidden_size}"
        return (f"L{self.num_layers}-H{self.hidden_size}-{mlp}"
                f"-A{self.num_attention_heads}-G{self.num_query_groups}")

    @property
    def budget_params(self) -> dict[str, int]:
        """The counts ``search.budget`` chooses from: ``{"total": .., "active": ..}``."""
        return {"total": self.params,
                "active": self.params if self.active_params is None else self.active_params}

    def target(self, layer_metric: str = "block_importance") -> Target:
        """The prune target of this shape."""
        moe = self.num_moe_experts is not None
        return Target(num_layers=self.num_layers, hidden_size=self.hidden_size,
                      ffn_hidden_size=None if moe else self.ffn_hidden_size,
                      num_attention_heads=self.num_attention_heads,
                      num_query_groups=self.num_query_groups,
                      num_moe_experts=self.num_moe_experts,
                      moe_ffn_hidden_size=self.moe_ffn_hidden_size, layer_metric=layer_metric,
                      hardware_multiple=1)


def shape_config(src: ModelConfig, c: Candidate) -> ModelConfig:
    """The pruned model's config (``prune.plan.pruned_config`` of the candidate's target)."""
    return pruned_config(src, c.target())


def _values(size: int, step: int, max_prune: float, multiple_of: int = 1) -> list[int]:
    """Multiples of ``step`` (and ``multiple_of``) in [size * (1 - max_prune), size], and size."""
    lo = max(1, math.ceil(size * (1 - max_prune)))
    keep = {v for v in range(step, size + 1, step) if v >= lo} | {size}
    return sorted((v for v in keep if v % multiple_of == 0), reverse=True)


def grid(src: ModelConfig, s: SearchConfig, tp: int = 1, pp: int = 1,
         ep: int = 1) -> list[Candidate]:
    """Every pruned shape of the grid (the source shape itself excluded), with its counts;
    ``ep``: the expert-parallel size the experts divide by."""
    a, g = src.num_attention_heads, src.query_groups
    per_group = a // g
    def divisor(name: str) -> int:
        return layout_divisor(name, tp, pp)

    layers = _values(src.num_layers, s.num_layers_step, s.max_num_layers_prune,
                     divisor("num_layers"))
    hidden = _values(src.hidden_size, s.hidden_size_step, s.max_hidden_size_prune,
                     divisor("hidden_size"))
    if src.is_moe:  # (experts, expert width); ffn_hidden_size stays the source's
        assert src.num_moe_experts is not None
        experts = [e for e in _values(src.num_moe_experts, s.num_moe_experts_step,
                                      s.max_num_moe_experts_prune, ep)
                   if e >= src.moe_router_topk]
        mlps = list(itertools.product([src.ffn_hidden_size], experts, _values(
            src.expert_ffn_hidden_size, s.moe_ffn_hidden_size_step,
            s.max_moe_ffn_hidden_size_prune, divisor("moe_ffn_hidden_size"))))
    else:
        mlps = [(f, None, None) for f in _values(
            src.ffn_hidden_size, s.ffn_hidden_size_step, s.max_ffn_hidden_size_prune,
            divisor("ffn_hidden_size"))]
    heads = []
    for new_g in _values(g, s.num_query_groups_step, s.max_num_attention_heads_prune):
        for hpg in ([per_group] if s.proportional_heads else range(per_group, 0, -1)):
            new_a = new_g * hpg
            divisible = new_a % divisor("num_attention_heads") == 0 \
                and new_g % divisor("num_query_groups") == 0
            if new_a >= a * (1 - s.max_num_attention_heads_prune) and divisible:
                heads.append((new_a, new_g))
    source = (src.num_layers, src.hidden_size, src.ffn_hidden_size, src.num_moe_experts,
              src.expert_ffn_hidden_size if src.is_moe else None, a, g)
    out = []
    for n_l, h, (f, e, ef), (n_a, n_g) in itertools.product(layers, hidden, mlps, heads):
        if (n_l, h, f, e, ef, n_a, n_g) == source:
            continue
        c = Candidate(n_l, h, f, n_a, n_g, 0, num_moe_experts=e, moe_ffn_hidden_size=ef)
        cfg = shape_config(src, c)
        out.append(dataclasses.replace(
            c, params=count_params(cfg),
            active_params=count_params(cfg, active=True) if src.is_moe else None))
    return out


def enumerate_candidates(src: ModelConfig, s: SearchConfig, tp: int = 1, pp: int = 1,
                         ep: int = 1) -> list[Candidate]:
    """Grid shapes within the budget (``s.budget``: on total or active parameters), closest
    first (at most ``max_candidates``); one-line errors for a budget above the source, an empty
    grid, or a budget no shape meets."""
    if s.target_params is None:
        raise ConfigError("search.target_params must be set (the pruned model's parameters)")
    have = count_params(src, active=s.budget == "active")
    if s.target_params >= have:
        raise ConfigError(f"search.target_params={s.target_params} is not below the source's "
                          f"{have} {s.budget} parameters (search.budget={s.budget})")
    shapes = grid(src, s, tp, pp, ep)
    if not shapes:
        raise ConfigError("the grid produces no candidate: widen search.max_*_prune or use "
                          "smaller search.*_step values")
    lo, hi = s.target_params * (1 - s.tolerance), s.target_params * (1 + s.tolerance)

    def count(c: Candidate) -> int:
        return c.budget_params[s.budget]

    def distance(c: Candidate) -> tuple[int, str]:
        return abs(count(c) - s.target_params), c.name

    inside = sorted((c for c in shapes if lo <= count(c) <= hi), key=distance)
    if not inside:
        near = ", ".join(f"{c.name} ({count(c)})" for c in sorted(shapes, key=distance)[:3])
        raise ConfigError(f"search.target_params={s.target_params}: no candidate within "
                          f"search.tolerance={s.tolerance} ({int(lo)}..{int(hi)} {s.budget} "
                          f"parameters); nearest: {near}")
    return inside[:s.max_candidates]

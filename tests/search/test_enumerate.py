"""Candidate enumeration: every grid shape's predicted count equals the built GPTModel's (an
MoE source's total and active counts too), the plan builds the same config, the budget filter
(on total or active parameters), and the rank correlation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.importance.scores import Scores
from nemo_minitron.model.params import count_params
from nemo_minitron.prune.plan import make_plan
from nemo_minitron.search.enumerate import (
    SearchConfig,
    enumerate_candidates,
    grid,
    shape_config,
)
from nemo_minitron.search.report import spearman
from tests.dist import spawn

GQA = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
                  num_query_groups=4, seq_length=32, vocab_size=256)
# Every term of the count switched on: biases, LayerNorm, GeLU, learned positions, tied output.
BIASED = dataclasses.replace(GQA, num_query_groups=None, normalization="LayerNorm",
                             activation="gelu", add_bias_linear=True,
                             position_embedding_type="learned_absolute",
                             share_embeddings_and_output_weights=True)
FINE = SearchConfig(hidden_size_step=16, ffn_hidden_size_step=32, proportional_heads=False)
# 4 experts (top-2) of width 64 and a shared expert: experts 4..2, width 64 or 32.
MOE = dataclasses.replace(GQA, num_layers=2, num_moe_experts=4, moe_router_topk=2,
                          moe_ffn_hidden_size=64, moe_shared_expert_intermediate_size=32,
                          moe_shared_expert_gate=True)
MOE_FINE = SearchConfig(hidden_size_step=16, moe_ffn_hidden_size_step=32)


def _built_counts(cfgs: list[ModelConfig], out: str) -> None:
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig())
    torch.save([sum(p.numel() for p in build_model(c).parameters()) for c in cfgs], out)


def _random_scores(cfg: ModelConfig) -> Scores:
    g = torch.Generator().manual_seed(0)
    L = cfg.num_layers
    heads = torch.rand(L, cfg.num_attention_heads, generator=g)
    return Scores(ffn=torch.rand(L, cfg.ffn_hidden_size, generator=g),
                  heads=heads,
                  groups=heads.view(L, cfg.query_groups, -1).sum(-1),
                  hidden=torch.rand(cfg.hidden_size, generator=g),
                  layers=torch.rand(L, generator=g))


def test_predicted_params_equal_built_params(tmp_path):
    shapes = [(GQA, c) for c in grid(GQA, FINE)] + [(BIASED, c) for c in grid(BIASED, FINE)]
    # 3 layer counts x 3 widths x 3 ffn sizes x 4 (heads, groups), less the source itself.
    assert len([1 for src, _ in shapes if src is GQA]) == 3 * 3 * 3 * 4 - 1
    heads = {(c.num_attention_heads, c.num_query_groups) for src, c in shapes if src is GQA}
    assert heads == {(8, 4), (4, 4), (6, 3), (4, 2)}
    cfgs = [shape_config(src, c) for src, c in shapes]
    # The prune plan of every 7th candidate: its model, built, has the candidate's count too.
    planned = [(src, c) for src, c in shapes[::7]]
    plans = [make_plan(src, _random_scores(src), c.target()).config for src, c in planned]
    spawn(_built_counts, 1, cfgs + plans, str(tmp_path / "counts.pt"))
    built = torch.load(tmp_path / "counts.pt")
    assert [c.params for _, c in shapes] == built[:len(cfgs)]
    assert [c.params for _, c in planned] == built[len(cfgs):]


def _built_moe_counts(cfgs: list[ModelConfig], out: str) -> None:
    """``(total, active)`` per config, read off the built model: all its parameters, less
    ``E - k`` of every layer's experts."""
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig())
    counts = []
    for c in cfgs:
        model = build_model(c)
        total = sum(p.numel() for p in model.parameters())
        idle = 0
        for layer in model.decoder.layers:
            experts = layer.mlp.experts.local_experts
            assert len(experts) == c.num_moe_experts
            idle += sum(p.numel() for e in experts[c.moe_router_topk:] for p in e.parameters())
        counts.append((total, total - idle))
    torch.save(counts, out)


def test_moe_candidates_vary_experts_and_their_width_with_built_counts(tmp_path):
    shapes = grid(MOE, MOE_FINE)
    # 2 layer counts x 3 widths x 3 expert counts x 2 expert widths x 3 group counts, less one.
    assert len(shapes) == 2 * 3 * 3 * 2 * 3 - 1
    assert {(c.num_moe_experts, c.moe_ffn_hidden_size) for c in shapes} == {
        (e, f) for e in (4, 3, 2) for f in (64, 32)}
    assert {c.ffn_hidden_size for c in shapes} == {MOE.ffn_hidden_size}  # unused by MoE layers
    assert shapes[0].name == "L2-H64-E4-EF64-A6-G3"
    # Experts never go below top-k, and divide by the expert-parallel size.
    assert {c.num_moe_experts for c in grid(MOE, dataclasses.replace(
        MOE_FINE, max_num_moe_experts_prune=0.75))} == {4, 3, 2}
    assert {c.num_moe_experts for c in grid(MOE, MOE_FINE, ep=2)} == {4, 2}
    cfgs = [shape_config(MOE, c) for c in shapes[::4]]
    spawn(_built_moe_counts, 1, cfgs, str(tmp_path / "counts.pt"))
    assert [(c.params, c.active_params) for c in shapes[::4]] == torch.load(tmp_path / "counts.pt")


def test_moe_budget_bounds_total_or_active_parameters():
    target = count_params(MOE, active=True) * 4 // 5
    s = dataclasses.replace(MOE_FINE, target_params=target, tolerance=0.05, max_candidates=100)
    got = {}
    for budget in ("total", "active"):
        b = dataclasses.replace(s, budget=budget)
        got[budget] = enumerate_candidates(MOE, b)
        counts = [c.active_params if budget == "active" else c.params for c in got[budget]]
        assert counts and all(abs(n - target) <= 0.05 * target for n in counts), budget
        assert {c.name for c in got[budget]} == {
            c.name for c in grid(MOE, b)
            if abs(c.budget_params[budget] - target) <= 0.05 * target}
    # Expert removal lowers the total only: the active budget takes every expert count.
    assert {c.num_moe_experts for c in got["active"]} == {4, 3, 2}
    assert {c.name for c in got["total"]} != {c.name for c in got["active"]}
    with pytest.raises(ConfigError, match="not below the source's .* active parameters"):
        enumerate_candidates(MOE, dataclasses.replace(
            s, budget="active", target_params=count_params(MOE, active=True)))


def test_budget_keeps_the_closest_candidates_within_tolerance():
    target = count_params(GQA) * 3 // 4
    s = dataclasses.replace(FINE, target_params=target, tolerance=0.03, max_candidates=100)
    got = enumerate_candidates(GQA, s)
    every = grid(GQA, s)
    inside = [c for c in every if abs(c.params - target) <= 0.03 * target]
    assert {c.name for c in got} == {c.name for c in inside} and got
    assert [abs(c.params - target) for c in got] == sorted(abs(c.params - target) for c in got)
    assert len(enumerate_candidates(GQA, dataclasses.replace(s, max_candidates=2))) == 2
    # Under TP=2 / PP=2 every candidate is a valid layout.
    for c in enumerate_candidates(GQA, s, tp=2, pp=2):
        assert c.num_layers % 2 == 0 and c.ffn_hidden_size % 2 == 0
        assert c.num_attention_heads % 2 == 0 and c.num_query_groups % 2 == 0


@pytest.mark.parametrize("change, needle", [
    ({"target_params": 10**9}, "is not below the source's"),
    ({"target_params": 1000}, "no candidate within search.tolerance=0.05"),
    ({"target_params": 1000, "max_num_layers_prune": 0.0, "max_hidden_size_prune": 0.0,
      "max_ffn_hidden_size_prune": 0.0, "max_num_attention_heads_prune": 0.0},
     "the grid produces no candidate"),
    ({}, "search.target_params must be set"),
])
def test_bad_budget(change, needle):
    with pytest.raises(ConfigError, match=needle):
        enumerate_candidates(GQA, dataclasses.replace(FINE, **change))


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    for n in (2, 3, 5, 9):
        a = torch.randint(0, 4, (n,), generator=g).tolist()  # ties included
        b = torch.rand(n, generator=g).tolist()
        want = stats.spearmanr(a, b).statistic
        got = spearman(a, b)
        if want != want:  # NaN: a constant ranking
            assert got is None
        else:
            assert got == pytest.approx(want, abs=1e-12)
    assert spearman([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)


def test_deprecated_step_keys_read_with_a_warning():
    from nemo_minitron.config import ConfigError, load_recipe
    from nemo_minitron.search.stage import SearchRecipe

    with pytest.warns(FutureWarning, match="'search.hidden_step' is deprecated"):
        r = load_recipe(None, ["search.hidden_step=32", "search.groups_step=2"], cls=SearchRecipe)
    assert (r.search.hidden_size_step, r.search.num_query_groups_step) == (32, 2)
    with pytest.raises(ConfigError, match="give only the new one"):
        load_recipe(None, ["search.ffn_step=32", "search.ffn_hidden_size_step=64"],
                    cls=SearchRecipe)
    old = {"max_layers_prune": "max_num_layers_prune", "max_hidden_prune": "max_hidden_size_prune",
           "max_ffn_prune": "max_ffn_hidden_size_prune",
           "max_heads_prune": "max_num_attention_heads_prune"}
    for i, (key, new) in enumerate(old.items()):
        with pytest.warns(FutureWarning, match=f"'search.{key}' is deprecated; use "
                                               f"'search.{new}'"):
            r = load_recipe(None, [f"search.{key}=0.{i + 1}"], cls=SearchRecipe)
        assert getattr(r.search, new) == pytest.approx(0.1 * (i + 1))

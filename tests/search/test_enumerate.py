"""Candidate enumeration: every grid shape's predicted count equals the built GPTModel's, the
plan builds the same config, the budget filter, and the rank correlation."""

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

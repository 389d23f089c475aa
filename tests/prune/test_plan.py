"""Target validation and kept-index choice (pure tensor logic, no model)."""

from __future__ import annotations

import pytest
import torch

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.importance.scores import Scores
from nemo_minitron.model.params import count_params
from nemo_minitron.prune.plan import Target, make_plan, validate_target

CFG = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
                  num_query_groups=4, seq_length=32, vocab_size=256)


def _scores(cfg: ModelConfig = CFG) -> Scores:
    g = torch.Generator().manual_seed(0)
    L = cfg.num_layers
    heads = torch.rand(L, cfg.num_attention_heads, generator=g)
    return Scores(ffn=torch.rand(L, cfg.ffn_hidden_size, generator=g),
                  heads=heads,
                  groups=heads.view(L, cfg.query_groups, -1).sum(-1),
                  hidden=torch.rand(cfg.hidden_size, generator=g),
                  layers=torch.tensor([0.9, 0.1, 0.3, 0.8]))


def test_keeps_the_best_units_in_order():
    s = _scores()
    plan = make_plan(CFG, s, Target(num_layers=2, ffn_hidden_size=64, hidden_size=32,
                                    num_query_groups=2))
    assert plan.kept_layers == [0, 3]  # highest Block Importance, original order
    assert plan.kept_hidden.tolist() == sorted(torch.topk(s.hidden, 32).indices.tolist())
    for i in plan.kept_layers:
        assert plan.kept_ffn[i].tolist() == sorted(
            torch.topk(s.ffn[i], 64).indices.tolist())
        assert plan.kept_groups[i].tolist() == sorted(
            torch.topk(s.groups[i], 2).indices.tolist())
    c = plan.config
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size) == (2, 32, 64)
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (4, 2, 8)
    assert count_params(c) < count_params(CFG)


def test_heads_are_ranked_inside_their_group():
    s = _scores()
    plan = make_plan(CFG, s, Target(num_attention_heads=4))  # 4 groups x 1 head
    for i in range(4):
        assert plan.kept_groups[i].tolist() == [0, 1, 2, 3]
        for g, (h,) in enumerate(plan.kept_heads[i].tolist()):
            pair = s.heads[i, 2 * g:2 * g + 2]
            assert h == 2 * g + int(pair.argmax())


@pytest.mark.parametrize("num_layers, dropped", [(3, [2]), (2, [1, 2]), (1, [0, 1, 2]),
                                                 (4, [])])
def test_angular_distance_drops_the_closest_block(num_layers, dropped):
    # Boundaries 0..4; d[i, j] for i < j: small for (2,3), (1,3), (0,3) and symmetric.
    d = torch.full((5, 5), 0.5)
    for (i, j), v in {(2, 3): 0.01, (1, 3): 0.05, (0, 3): 0.2, (1, 2): 0.3,
                      (3, 4): 0.4, (2, 4): 0.45}.items():
        d[i, j] = d[j, i] = v
    d.fill_diagonal_(0)
    s = _scores()
    s.angular_distance = d
    plan = make_plan(CFG, s, Target(num_layers=num_layers, layer_metric="angular_distance"))
    assert plan.kept_layers == [i for i in range(4) if i not in dropped]


def test_angular_distance_needs_the_matrix():
    with pytest.raises(ConfigError, match="layer_metric=angular_distance needs activation"):
        make_plan(CFG, _scores(), Target(num_layers=3, layer_metric="angular_distance"))
    s = _scores()
    s.angular_distance = torch.zeros(4, 4)
    with pytest.raises(ConfigError, match=r"angular_distance scores have shape \(4, 4\)"):
        make_plan(CFG, s, Target(num_layers=3, layer_metric="angular_distance"))


def test_explicit_drop_layers():
    plan = make_plan(CFG, _scores(), Target(drop_layers=[1, 2]))
    assert plan.kept_layers == [0, 3] and plan.config.num_layers == 2


@pytest.mark.parametrize("target, tp, message", [
    (Target(hidden_size=128), 1, "target.hidden_size=128 is larger than the source's 64"),
    (Target(num_attention_heads=6, num_query_groups=4), 1,
     "target.num_attention_heads=6 is not divisible by target.num_query_groups=4"),
    (Target(num_attention_heads=8, num_query_groups=2), 1,
     "target keeps 4 heads per query group; the source has only 2"),
    (Target(ffn_hidden_size=99), 2,
     "target.ffn_hidden_size=99 is not divisible by parallel.tensor_model_parallel_size=2"),
    (Target(drop_layers=[4]), 1, "target.drop_layers names layer 4"),
    (Target(num_layers=0), 1, "target.num_layers=0 must be a positive integer"),
])
def test_bad_targets(target, tp, message):
    with pytest.raises(ConfigError, match=message):
        make_plan(CFG, _scores(), target, tp=tp)


def test_scores_of_another_model_are_refused():
    other = ModelConfig(num_layers=4, hidden_size=96, ffn_hidden_size=128, num_attention_heads=8,
                        num_query_groups=4, seq_length=32, vocab_size=256)
    with pytest.raises(ConfigError, match="scores were computed on a different model"):
        make_plan(CFG, _scores(other), Target(hidden_size=32))


def test_unfriendly_width_warns_once(nm_log):
    t = Target(ffn_hidden_size=100)
    validate_target(CFG, t)  # what the prune verb does first, then make_plan again
    make_plan(CFG, _scores(), t)
    assert nm_log() == ["target.ffn_hidden_size=100 is not a multiple of 64: the pruned model "
                        "works, but GPU matrix products run slower at such widths (64 or 128 "
                        "would not); target.hardware_multiple sets the multiple"]

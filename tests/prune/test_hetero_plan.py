"""Per-layer pruning plans (``Target.layer_shapes``, ``prune.hetero``): each layer keeps its own
best units, removed groups' heads are re-attached to kept groups, and bad per-layer targets
are refused naming the layer."""

from __future__ import annotations

import pytest
import torch

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.config.hetero import LayerShape
from nemo_minitron.importance.scores import Scores
from nemo_minitron.model.params import count_params
from nemo_minitron.prune.plan import Target, make_plan

SRC = ModelConfig(num_layers=3, hidden_size=32, ffn_hidden_size=64, num_attention_heads=8,
                  num_query_groups=4, kv_channels=8, seq_length=16, vocab_size=128)


def _scores() -> Scores:
    g = torch.Generator().manual_seed(0)
    heads = torch.rand(3, 8, generator=g)
    return Scores(ffn=torch.rand(3, 64, generator=g), heads=heads,
                  groups=heads.reshape(3, 4, 2).sum(-1), hidden=torch.rand(32, generator=g),
                  layers=torch.rand(3, generator=g))


SHAPES = [LayerShape(num_query_groups=2, ffn_hidden_size=48),
          LayerShape(attention="no_op", ffn_hidden_size=16),
          LayerShape(num_query_groups=1, mlp="linear")]


def test_each_layer_keeps_its_own_best_units() -> None:
    s = _scores()
    plan = make_plan(SRC, s, Target(layer_shapes=SHAPES))
    assert plan.config.layer_shapes == SHAPES and plan.config.hidden_size == 32
    for i, f in ((0, 48), (1, 16)):
        assert plan.kept_ffn[i].tolist() == sorted(torch.argsort(-s.ffn[i])[:f].tolist())
    assert 2 not in plan.kept_ffn and 1 not in plan.kept_groups
    best2 = sorted(torch.argsort(-s.groups[0])[:2].tolist())
    assert plan.kept_groups[0].tolist() == best2
    # Every head stays; kept groups keep their own heads first, in order.
    heads = plan.kept_heads[0]
    assert heads.shape == (2, 4) and sorted(heads.flatten().tolist()) == list(range(8))
    for row, grp in zip(heads.tolist(), best2):
        assert row[:2] == [2 * grp, 2 * grp + 1]
    assert plan.kept_heads[2].shape == (1, 8)
    # The pruned config's count: independent per-block sums of the source's.
    h, d = 32, 8
    attn = lambda g: h + (8 + 2 * g) * d * h + h * 8 * d  # noqa: E731 (norm, qkv, proj)
    mlp = lambda f: h + 3 * f * h  # noqa: E731 (norm, SwiGLU fc1, fc2)
    linear = h + h * h
    layers = attn(2) + mlp(48) + mlp(16) + attn(1) + linear
    assert count_params(plan.config) == 2 * 128 * h + h + layers


@pytest.mark.parametrize("shapes,tp,needle", [
    ([LayerShape(), LayerShape(ffn_hidden_size=33), LayerShape()], 2,
     "target.layer_shapes[1].ffn_hidden_size=33"),
    ([LayerShape(), LayerShape(), LayerShape(num_query_groups=1)], 2,
     "target.layer_shapes[2].num_query_groups=1"),
    ([LayerShape(num_query_groups=8), LayerShape(), LayerShape()], 1,
     "target.layer_shapes[0].num_query_groups=8 is larger than the source's 4"),
    ([LayerShape()], 1, "target.layer_shapes has 1 entries"),
])
def test_bad_layer_targets(shapes, tp, needle) -> None:
    with pytest.raises(ConfigError) as e:
        make_plan(SRC, _scores(), Target(layer_shapes=shapes), tp=tp)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_layer_target_with_other_axes() -> None:
    with pytest.raises(ConfigError, match="target.layer_shapes with target.hidden_size"):
        make_plan(SRC, _scores(), Target(layer_shapes=SHAPES, hidden_size=16))

"""``Scores`` files: saved and loaded under the axis names, and files written before the rename
(tensors under the config field names, ``ffn_hidden_size`` ...) still load."""

from __future__ import annotations

import torch

from nemo_minitron.importance.baselines import random_scores
from nemo_minitron.importance.scores import Scores

OLD_KEYS = {"ffn": "ffn_hidden_size", "heads": "num_attention_heads",
            "groups": "num_query_groups", "hidden": "hidden_size", "layers": "num_layers"}
"""What an older version wrote (written out here, not read from ``Scores.SIZES``)."""


def _scores() -> Scores:
    from nemo_minitron.config import ModelConfig

    return random_scores(ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=96,
                                     num_attention_heads=4, num_query_groups=2), seed=5)


def test_save_load_round_trip(tmp_path):
    s = _scores()
    s.angular_distance = torch.rand(4, 4)
    s.save(tmp_path / "s.pt")
    got = Scores.load(tmp_path / "s.pt")
    assert set(torch.load(tmp_path / "s.pt")) == {*OLD_KEYS, "angular_distance", "meta"}
    for axis in (*OLD_KEYS, "angular_distance"):
        assert torch.equal(getattr(got, axis), getattr(s, axis)), axis
    assert got.meta == s.meta


def test_a_file_with_the_old_key_names_loads(tmp_path):
    s = _scores()
    torch.save({**{old: getattr(s, new) for new, old in OLD_KEYS.items()}, "meta": s.meta},
               tmp_path / "old.pt")
    got = Scores.load(tmp_path / "old.pt")
    for axis in OLD_KEYS:
        assert torch.equal(getattr(got, axis), getattr(s, axis)), axis
    assert got.angular_distance is None and got.meta["seed"] == 5


def test_moe_scores_round_trip(tmp_path):
    from nemo_minitron.config import ModelConfig

    s = random_scores(ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48,
                                  num_attention_heads=4, num_query_groups=2, num_moe_experts=4,
                                  moe_router_topk=2, moe_ffn_hidden_size=24,
                                  moe_shared_expert_intermediate_size=40), seed=1)
    s.expert_mass, s.expert_load = torch.rand(2, 4), torch.rand(2, 4)
    s.save(tmp_path / "moe.pt")
    got = Scores.load(tmp_path / "moe.pt")
    for axis in ("experts", "expert_mass", "expert_load", "expert_ffn", "expert_channels",
                 "shared_expert_ffn"):
        assert getattr(s, axis) is not None and torch.equal(getattr(got, axis),
                                                             getattr(s, axis)), axis

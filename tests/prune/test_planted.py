"""Planted test: units made inert (their activation exactly zero) rank lowest, and pruning
exactly them leaves the logits unchanged; parameter counts equal the config's prediction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist import in_order, spawn

FFN_DEAD = [3, 17, 40, 77]
HIDDEN_DEAD = [5, 33, 60]


def planted_job(out: str, gqa: bool) -> None:
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.importance.estimator import estimate_importance
    from nemo_minitron.model import layouts
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.model.params import count_params
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.prune.apply import prune_model
    from nemo_minitron.prune.plan import Target, make_plan

    init_distributed(ParallelConfig(), seed=5)
    groups = 4 if gqa else 8
    cfg = ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
                      num_query_groups=groups, kv_channels=8, seq_length=32, vocab_size=256)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)
    dead_groups = [2] if gqa else [1, 6]
    with torch.no_grad():
        model.embedding.word_embeddings.weight[:, HIDDEN_DEAD] = 0
        for layer in model.decoder.layers:
            fc1 = layer.mlp.linear_fc1.weight
            fc1[layouts.fc1_rows(cfg, torch.tensor(FFN_DEAD))] = 0  # gate and up rows
            for g in dead_groups:  # zero q, k and v of the whole group
                layer.self_attention.linear_qkv.weight[layouts.qkv_group_rows(cfg, g)] = 0
            layer.self_attention.linear_proj.weight[HIDDEN_DEAD] = 0
            layer.mlp.linear_fc2.weight[HIDDEN_DEAD] = 0
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))
    before = forward_logits(model, tokens)
    scores = estimate_importance(model, tokens, micro_batch_size=4)
    target = Target(ffn_hidden_size=128 - len(FFN_DEAD), hidden_size=64 - len(HIDDEN_DEAD),
                    hardware_multiple=1,
                    **({"num_query_groups": 3} if gqa else {"num_attention_heads": 6}))
    plan = make_plan(cfg, scores, target)
    pruned = prune_model(model, plan)
    after = forward_logits(pruned, tokens)
    torch.save({"scores": scores, "before": before, "after": after, "plan": plan,
                "count": sum(p.numel() for p in pruned.parameters()),
                "predicted": count_params(plan.config)}, out)


def _lowest(x: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(x)[:k].tolist())


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """Both variants in one start-up."""
    d = tmp_path_factory.mktemp("planted")
    spawn(in_order, 1, [(planted_job, (str(d / f"{gqa}.pt"), gqa)) for gqa in (False, True)])
    return d


@pytest.mark.parametrize("gqa", [False, True], ids=["mha_heads", "gqa_groups"])
def test_planted_units_rank_lowest_and_prune_exactly(planted, gqa):
    r = torch.load(planted / f"{gqa}.pt", weights_only=False)
    s, plan = r["scores"], r["plan"]
    assert _lowest(s.hidden, 3) == set(HIDDEN_DEAD)
    assert (s.hidden[HIDDEN_DEAD] == 0).all()
    for i in range(3):
        assert _lowest(s.ffn[i], 4) == set(FFN_DEAD)
        if gqa:
            assert _lowest(s.groups[i], 1) == {2}
            assert 2 not in plan.kept_groups[i].tolist()
        else:
            assert _lowest(s.heads[i], 2) == {1, 6}
            assert not {1, 6} & set(plan.kept_heads[i].flatten().tolist())
        assert not set(FFN_DEAD) & set(plan.kept_ffn[i].tolist())
    assert not set(HIDDEN_DEAD) & set(plan.kept_hidden.tolist())
    assert r["count"] == r["predicted"]
    torch.testing.assert_close(r["after"], r["before"], atol=1e-5, rtol=0)

"""LM-loss depth importance: skipping a block in place equals rebuilding the model without it."""

from __future__ import annotations

import torch

from tests.dist import spawn


def block_job(out: str) -> None:
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.importance.estimator import estimate_importance
    from nemo_minitron.importance.layers import block_loss_increase
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import lm_loss
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.prune.apply import prune_model
    from nemo_minitron.prune.plan import Target, make_plan

    init_distributed(ParallelConfig(), seed=11)
    cfg = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                      num_query_groups=2, seq_length=32, vocab_size=256)
    model = build_model(cfg)
    tokens = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(4))
    base = lm_loss(model, tokens, 4)
    increase = block_loss_increase(model, tokens, 4, block=2, num_layers=4)
    assert lm_loss(model, tokens, 4) == base  # the context restored every layer
    scores = estimate_importance(model, tokens[:, :-1], micro_batch_size=4)
    rebuilt = []
    for start in range(3):
        plan = make_plan(cfg, scores, Target(drop_layers=[start, start + 1]))
        rebuilt.append(lm_loss(prune_model(model, plan), tokens, 4) - base)
    torch.save({"increase": increase, "rebuilt": torch.tensor(rebuilt)}, out)


def test_skipping_a_block_equals_removing_it(tmp_path):
    spawn(block_job, 1, str(tmp_path / "r.pt"))
    r = torch.load(tmp_path / "r.pt")
    assert r["increase"].shape == (3,)
    torch.testing.assert_close(r["increase"], r["rebuilt"], atol=1e-5, rtol=0)
    assert (r["increase"].abs() > 1e-6).any()

"""LM-loss depth importance: skipping a block in place equals rebuilding the model without it;
boundary cosines exact to float64 where layers are nearly identities."""

from __future__ import annotations

import math

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


def test_boundary_distances_of_nearly_identical_layers_match_float64():
    """1 - cos down to ~2e-9 (a layer that barely changes the residual stream, what depth
    pruning looks for): arccos and 1 - cos amplify rounding there (a float32 Gram matrix is
    off by more than 50% on these inputs); the sums equal a float64 recomputation to 1e-6."""
    from nemo_minitron.importance.layers import boundary_distance_sums

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g)
    bounds = [x]
    for step in (1e-1, 1e-2, 1e-3, 3e-4):  # each layer changes its input by ~step
        bounds.append(bounds[-1] * 1.5 + step * torch.randn(300, 64, generator=g))
    stacked = torch.stack(bounds, dim=1)  # [tokens, B, h]
    angle, gap = boundary_distance_sums(stacked, chunk_bytes=40_000)  # several chunks
    B = len(bounds)
    want_angle = torch.zeros(B, B, dtype=torch.float64)
    want_gap = torch.zeros(B, B, dtype=torch.float64)
    for i in range(B):
        for j in range(B):
            if i != j:
                cos = torch.nn.functional.cosine_similarity(bounds[i].double(),
                                                            bounds[j].double(), dim=-1)
                want_gap[i, j] = (1 - cos).sum()
                want_angle[i, j] = (torch.arccos(cos.clamp(-1, 1)) / math.pi).sum()
    assert want_gap[B - 2, B - 1] / 300 < 1e-8  # the last layer is nearly an identity
    torch.testing.assert_close(gap, want_gap, rtol=1e-6, atol=0)
    torch.testing.assert_close(angle, want_angle, rtol=1e-6, atol=0)

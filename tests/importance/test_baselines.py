"""Baseline importance criteria: weight-magnitude scores equal a recomputation from the TP=1
model's own modules, also when gathered from a TP=2 model; random scores follow their seed."""

from __future__ import annotations

import pytest
import torch

from nemo_minitron.config import ModelConfig
from nemo_minitron.importance.baselines import random_scores
from tests.dist import spawn

CFG = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
           num_query_groups=4, seq_length=32, vocab_size=256)


def magnitude_job(out: str, tp: int, ckpt: str) -> None:
    import torch.distributed as dist

    from nemo_minitron.checkpoint.io import load_weights, save_checkpoint
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.importance.baselines import magnitude_scores
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.full_state import gather_full_state_dict
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp), seed=3)
    cfg = ModelConfig(**CFG)
    model = build_model(cfg)
    if tp == 1:
        save_checkpoint(ckpt, model, model_cfg=cfg, tokenizer=None)
    else:
        load_weights(ckpt, model)
    scores = magnitude_scores(gather_full_state_dict(model), cfg)
    ref = None
    if tp == 1:  # from the modules' own weights, written out per unit
        f, d = cfg.ffn_hidden_size, cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
        ffn, heads = [], []
        for layer in model.decoder.layers:
            fc1, fc2 = layer.mlp.linear_fc1.weight, layer.mlp.linear_fc2.weight
            ffn.append(torch.stack([fc1[n].norm() * fc1[f + n].norm() * fc2[:, n].norm()
                                    for n in range(f)]))
            proj = layer.self_attention.linear_proj.weight
            heads.append(torch.stack([proj[:, k * d:(k + 1) * d].norm()
                                      for k in range(cfg.num_attention_heads)]))
        emb = model.embedding.word_embeddings.weight
        ref = {"ffn": torch.stack(ffn).detach(), "heads": torch.stack(heads).detach(),
               "hidden": emb.norm(dim=0).detach()}
    if dist.get_rank() == 0:
        torch.save({"scores": scores.__dict__, "ref": ref}, out)


@pytest.mark.dist
def test_magnitude_scores_recomputed_and_the_same_under_tp2(tmp_path):
    spawn(magnitude_job, 1, str(tmp_path / "tp1.pt"), 1, str(tmp_path / "ck"))
    spawn(magnitude_job, 2, str(tmp_path / "tp2.pt"), 2, str(tmp_path / "ck"))
    one, two = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tp2.pt")
    s, ref = one["scores"], one["ref"]
    torch.testing.assert_close(s["ffn"], ref["ffn"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["heads"], ref["heads"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["hidden"], ref["hidden"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["groups"],
                               ref["heads"].view(2, 4, 2).sum(-1), rtol=1e-5, atol=1e-6)
    for axis in ("ffn", "heads", "groups", "hidden", "layers"):
        torch.testing.assert_close(two["scores"][axis], s[axis], rtol=1e-6, atol=1e-7)


def test_random_scores_follow_the_seed():
    cfg = ModelConfig(**CFG)
    a, b, c = random_scores(cfg, 0), random_scores(cfg, 0), random_scores(cfg, 1)
    assert a.ffn.shape == (2, 128) and a.hidden.shape == (64,)
    assert a.groups.shape == (2, 4) and a.layers.shape == (2,)
    torch.testing.assert_close(a.groups, a.heads.view(2, 4, 2).sum(-1))
    assert torch.equal(a.ffn, b.ffn)
    assert not torch.equal(a.ffn, c.ffn)

"""Importance and pruning of an MoE model under expert parallelism: at EP=2 (two processes, two
of the four experts each, each with half of the calibration sequences) every score equals one
process's, and ``nm.prune`` keeps the same experts and channels (per expert) and gives the
one-process pruned logits (1e-5). The planted experts 0 and 1 (zero output) live on EP rank 0,
so both kept experts come from EP rank 1 and one of them moves to rank 0."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.dist import spawn

CFG = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
           num_query_groups=2, vocab_size=64, seq_length=16, num_moe_experts=4,
           moe_router_topk=2, moe_ffn_hidden_size=24, moe_shared_expert_intermediate_size=40,
           moe_shared_expert_gate=True)
TARGET = dict(num_moe_experts=2, moe_ffn_hidden_size=16, moe_ffn_selection="per_expert",
              hidden_size=24, hardware_multiple=1)
SCORES = ("experts", "expert_mass", "expert_load", "expert_ffn", "expert_channels",
          "shared_expert_ffn", "heads", "groups", "hidden", "layers")


def _tokens() -> torch.Tensor:
    return torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))


def ep_job(out: str, ep: int, ckpt: str) -> None:
    import nemo_minitron as nm
    from nemo_minitron.checkpoint.io import load_weights, save_checkpoint
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.model.build import build_model, unwrap
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(expert_model_parallel_size=ep), seed=11)
    cfg = ModelConfig(**CFG)
    model = build_model(cfg)
    if ep == 1:
        with torch.no_grad():  # experts 0 and 1 (EP rank 0's) add nothing
            for layer in unwrap(model).decoder.layers:
                for e in (0, 1):
                    layer.mlp.experts.local_experts[e].linear_fc2.weight.zero_()
        save_checkpoint(ckpt, model, model_cfg=cfg, tokenizer=None)
    else:
        load_weights(ckpt, model)
    rank, dp = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = _tokens()[rank * 8 // dp:(rank + 1) * 8 // dp]  # this data-parallel rank's share
    scores = nm.estimate_importance(model, mine, micro_batch_size=4 // dp)
    plan = nm.make_plan(cfg, scores, nm.Target(**TARGET), ep=ep)
    pruned = nm.prune(model, plan)
    result = {"scores": {f: getattr(scores, f) for f in SCORES},
              "experts": {i: k.tolist() for i, k in plan.kept_experts.items()},
              "channels": {i: k.tolist() for i, k in plan.kept_expert_ffn.items()},
              "logits": forward_logits(pruned, _tokens()),
              "local": len(unwrap(pruned).decoder.layers[0].mlp.experts.local_experts)}
    if int(os.environ["RANK"]) == 0:
        torch.save(result, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("moe_ep")
    spawn(ep_job, 1, str(d / "ep1.pt"), 1, str(d / "ck"))
    spawn(ep_job, 2, str(d / "ep2.pt"), 2, str(d / "ck"))
    return d


@pytest.mark.dist
def test_importance_and_pruning_under_ep2_equal_one_process(runs):
    one, two = torch.load(runs / "ep1.pt"), torch.load(runs / "ep2.pt")
    for name, want in one["scores"].items():
        torch.testing.assert_close(two["scores"][name], want, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert one["experts"] == two["experts"] == {0: [2, 3], 1: [2, 3]}
    assert one["channels"] == two["channels"]
    assert (one["local"], two["local"]) == (2, 1)
    torch.testing.assert_close(two["logits"], one["logits"], atol=1e-5, rtol=0)

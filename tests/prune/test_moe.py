"""Pruning an MoE ``GPTModel`` (``prune/moe.py``) with every axis at once (experts, expert and
shared-expert channels, hidden, heads, layers): the pruned model's logits equal those of a
model built at the pruned config and filled by hand from the source's weights in torch, at
TP=1, and TP=2 and PP=2 give the TP=1 logits. The plan keeps the experts the scores rank best:
a planted expert with zero output is removed by output norm (it has routing mass), a planted
never-routed expert by output norm and by routing mass. Each expert also has its own zero
channels: ``target.moe_ffn_selection=per_expert`` removes exactly those (the source's logits,
1e-5, also under TP=2 and PP=2), one index set per layer cannot."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from tests.dist import in_order, spawn

CFG = dict(num_layers=4, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
           num_query_groups=2, vocab_size=64, seq_length=16, num_moe_experts=5,
           moe_router_topk=2, moe_ffn_hidden_size=24, moe_shared_expert_intermediate_size=40,
           moe_shared_expert_gate=True)
TARGET = dict(num_moe_experts=3, moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=24,
              hidden_size=24, num_attention_heads=2, num_layers=2, hardware_multiple=1)
ZEROED, NEVER = 0, 2  # an expert with zero output, an expert the router never picks


def dead(e: int) -> list[int]:
    """Expert ``e``'s 8 zero channels (of 24): another set in every expert."""
    return sorted((3 + 5 * e + 3 * k) % 24 for k in range(8))



def _tokens() -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))


def _plant(model) -> None:
    """Router rows v, -v, 0, u, -u: two logits are always positive, so row 2 never wins top-2."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.decoder.layers:
            v, u = torch.randn(2, 32, generator=g)
            layer.mlp.router.weight.copy_(torch.stack([v, -v, torch.zeros(32), u, -u]))
            layer.mlp.experts.local_experts[ZEROED].linear_fc2.weight.zero_()
            for e, expert in enumerate(layer.mlp.experts.local_experts):
                fc1 = expert.linear_fc1.weight.view(2, 24, 32)  # [gate; up] rows
                fc1[:, dead(e)] = 0  # no activation, no output


def _by_hand(full: dict[str, torch.Tensor], plan) -> dict[str, torch.Tensor]:
    """The pruned model's full state dict from the source's, by plain indexing."""
    from nemo_minitron.model.layouts import qkv_rows

    src, hid = plan.source, plan.kept_hidden
    scale = math.sqrt(src.hidden_size / plan.config.hidden_size)

    def glu(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        gate, up = w.chunk(2)
        return torch.cat([gate[keep], up[keep]])[:, hid]

    out = {"embedding.word_embeddings.weight": full["embedding.word_embeddings.weight"][:, hid],
           "output_layer.weight": full["output_layer.weight"][:, hid],
           "decoder.final_layernorm.weight": full["decoder.final_layernorm.weight"][hid] * scale}
    for j, i in enumerate(plan.kept_layers):
        a, b = f"decoder.layers.{i}.", f"decoder.layers.{j}."
        heads = plan.kept_heads[i]
        rows = qkv_rows(src, plan.kept_groups[i].tolist(), heads.tolist())
        cols = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in heads.flatten().tolist()])
        out |= {b + "input_layernorm.weight": full[a + "input_layernorm.weight"][hid] * scale,
                b + "pre_mlp_layernorm.weight": full[a + "pre_mlp_layernorm.weight"][hid] * scale,
                b + "self_attention.linear_qkv.weight":
                    full[a + "self_attention.linear_qkv.weight"][rows][:, hid],
                b + "self_attention.linear_proj.weight":
                    full[a + "self_attention.linear_proj.weight"][hid][:, cols],
                b + "mlp.router.weight":
                    full[a + "mlp.router.weight"][plan.kept_experts[i]][:, hid]}
        f, s = plan.kept_expert_ffn[i], plan.kept_shared_ffn[i]
        for n, e in enumerate(plan.kept_experts[i].tolist()):
            x, y = f"{a}mlp.experts.local_experts.{e}.", f"{b}mlp.experts.local_experts.{n}."
            out[y + "linear_fc1.weight"] = glu(full[x + "linear_fc1.weight"], f)
            out[y + "linear_fc2.weight"] = full[x + "linear_fc2.weight"][hid][:, f]
        x, y = a + "mlp.shared_experts.", b + "mlp.shared_experts."
        out[y + "linear_fc1.weight"] = glu(full[x + "linear_fc1.weight"], s)
        out[y + "linear_fc2.weight"] = full[x + "linear_fc2.weight"][hid][:, s]
        out[y + "gate_weight"] = full[x + "gate_weight"][:, hid]
    return out


def prune_job(out: str, tp: int, pp: int, ckpt: str) -> None:
    """The planted source (made by the TP=1 job, read back by the others), its scores, the plan
    and the pruned logits under TP=tp, PP=pp."""
    import nemo_minitron as nm
    from nemo_minitron.checkpoint.io import load_weights, save_checkpoint
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.model.build import build_model, unwrap
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.model.full_state import gather_full_state_dict, load_full_state_dict
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp,
                                    pipeline_model_parallel_size=pp), seed=11)
    cfg = ModelConfig(**CFG)
    model = build_model(cfg)
    first = tp == pp == 1
    if first:
        _plant(unwrap(model))
        save_checkpoint(ckpt, model, model_cfg=cfg, tokenizer=None)
        nm.estimate_importance(model, _tokens()).save(ckpt + ".scores")
    else:
        load_weights(ckpt, model)
    scores = nm.Scores.load(ckpt + ".scores")
    plan = nm.make_plan(cfg, scores, nm.Target(**TARGET), tp, pp)
    pruned = nm.prune(model, plan)
    result = {"logits": forward_logits(pruned, _tokens())}
    per_expert = nm.make_plan(cfg, scores, nm.Target(moe_ffn_hidden_size=16, hardware_multiple=1,
                                                     moe_ffn_selection="per_expert"), tp, pp)
    result["per_expert"] = forward_logits(nm.prune(model, per_expert), _tokens())
    if first:
        by_mass = nm.make_plan(cfg, scores, nm.Target(**TARGET, expert_metric="router_mass"))
        reference = build_model(plan.config)
        load_full_state_dict(reference, _by_hand(gather_full_state_dict(model), plan),
                             plan.config)
        shared = nm.make_plan(cfg, scores, nm.Target(moe_ffn_hidden_size=16,
                                                     hardware_multiple=1))
        result |= {"shared": forward_logits(nm.prune(model, shared), _tokens()),
                   "per_expert_plan": per_expert}
        result |= {"plan": plan, "by_mass": by_mass, "scores": scores,
                   "reference": forward_logits(reference, _tokens()),
                   "source": forward_logits(model, _tokens()),
                   "count": sum(p.numel() for p in pruned.parameters()),
                   "built": sum(p.numel() for p in reference.parameters())}
    if int(os.environ["RANK"]) == torch.distributed.get_world_size() - 1:
        torch.save(result, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("moe_prune")
    ckpt = str(d / "ck")
    spawn(prune_job, 1, str(d / "tp1.pt"), 1, 1, ckpt)
    spawn(in_order, 2, [(prune_job, (str(d / "tp2.pt"), 2, 1, ckpt)),
                        (prune_job, (str(d / "pp2.pt"), 1, 2, ckpt))])
    return d


@pytest.mark.dist
def test_moe_prune_equals_a_model_filled_by_hand(runs):
    r = torch.load(runs / "tp1.pt", weights_only=False)
    plan, scores = r["plan"], r["scores"]
    assert r["logits"].shape == (4, 16, 64) and r["count"] == r["built"]
    torch.testing.assert_close(r["logits"], r["reference"], atol=1e-5, rtol=0)
    assert (r["logits"] - r["source"]).abs().max() > 1e-2  # the pruning changed something
    for i in plan.kept_layers:
        kept = set(plan.kept_experts[i].tolist())
        assert kept == set(torch.argsort(scores.experts[i], descending=True)[:3].tolist())
        assert not {ZEROED, NEVER} & kept  # zero output norm; never routed
        by_mass = set(r["by_mass"].kept_experts[i].tolist())
        assert by_mass == set(torch.argsort(scores.expert_mass[i], descending=True)[:3].tolist())
        assert NEVER not in by_mass and scores.expert_mass[i, ZEROED] > 0  # routed to
        assert len(plan.kept_expert_ffn[i]) == 16 and len(plan.kept_shared_ffn[i]) == 24


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_moe_prune_under_tp2_and_pp2_equals_tp1(runs, layout):
    ref = torch.load(runs / "tp1.pt", weights_only=False)["logits"]
    torch.testing.assert_close(torch.load(runs / f"{layout}.pt")["logits"], ref, atol=1e-5,
                               rtol=0)


@pytest.mark.dist
def test_per_expert_channels_remove_each_experts_own_zero_channels(runs):
    r = torch.load(runs / "tp1.pt", weights_only=False)
    plan = r["per_expert_plan"]
    for i in range(4):
        kept = plan.kept_expert_ffn[i]
        assert kept.shape == (5, 16)
        for e in set(range(5)) - {NEVER}:  # a never-routed expert's channels all score 0
            assert not set(kept[e].tolist()) & set(dead(e)), (i, e)
    torch.testing.assert_close(r["per_expert"], r["source"], atol=1e-5, rtol=0)
    assert (r["shared"] - r["source"]).abs().max() > 1e-3  # one set per layer cannot
    for layout in ("tp2", "pp2"):
        torch.testing.assert_close(torch.load(runs / f"{layout}.pt")["per_expert"],
                                   r["per_expert"], atol=1e-5, rtol=0)

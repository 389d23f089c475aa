"""MoE importance (``importance/moe.py``) on a tiny megatron-core MoE model with planted units:
an expert whose output weights are zero scores 0 by output norm yet keeps its routing mass; an
expert whose router row can never win top-2 (rows v, -v, 0, u, -u: two logits are always
positive) has no mass and no load. Every score equals a torch recomputation from the weights,
and TP=2, PP=2 and DP=2 give the TP=1 scores, every axis included. The weight-magnitude
baseline scores experts and their channels as the modules' own weights give."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.dist import in_order, spawn
from tests.helpers.moe import expert_activations, routing, swiglu

CFG = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
           num_query_groups=2, vocab_size=64, seq_length=16, num_moe_experts=5,
           moe_router_topk=2, moe_ffn_hidden_size=24, moe_shared_expert_intermediate_size=40,
           moe_shared_expert_gate=True)
ZEROED, NEVER = 0, 2
FIELDS = ("experts", "expert_mass", "expert_load", "expert_ffn", "expert_channels",
          "shared_expert_ffn", "heads", "groups", "hidden", "layers")


def _plant(model) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.decoder.layers:
            v, u = torch.randn(2, 32, generator=g)
            layer.mlp.router.weight.copy_(torch.stack([v, -v, torch.zeros(32), u, -u]))
            layer.mlp.experts.local_experts[ZEROED].linear_fc2.weight.zero_()


def _reference(mlp, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The scores of one layer from its MLP input ``x [s, b, h]``, in torch."""
    h = x.reshape(-1, x.shape[-1])
    w = routing(mlp, h)
    acts = expert_activations(mlp, h)
    experts = mlp.experts.local_experts
    out = torch.stack([(w[:, e:e + 1] * (a @ ex.linear_fc2.weight.T)).norm(dim=-1)
                       for e, (a, ex) in enumerate(zip(acts, experts))], 1)
    per_expert = torch.stack([(w[:, e:e + 1] * a).pow(2).sum(0) / len(h)
                              for e, a in enumerate(acts)])
    ffn = sum((w[:, e:e + 1] * a).pow(2).sum(0) for e, a in enumerate(acts)) / len(h)
    shared = swiglu(x, mlp.shared_experts.linear_fc1.weight).abs()
    return {"experts": out.mean(0), "expert_mass": w.mean(0),
            "expert_load": (w > 0).float().mean(0), "expert_ffn": ffn.sqrt(),
            "expert_channels": per_expert.sqrt(),
            "shared_expert_ffn": shared.mean(0).pow(2).sum(0).sqrt()}  # seq mean, batch l2


def _check_baselines(model, cfg) -> None:
    """Weight-magnitude scores of the MoE axes equal those of the modules' own weights; random
    scores have every MoE axis's shape."""
    from nemo_minitron.importance.baselines import magnitude_scores, random_scores
    from nemo_minitron.model.full_state import gather_full_state_dict

    got = magnitude_scores(gather_full_state_dict(model), cfg)

    def neurons(m) -> torch.Tensor:
        gate, up = m.linear_fc1.weight.double().chunk(2)
        return gate.norm(dim=1) * up.norm(dim=1) * m.linear_fc2.weight.double().norm(dim=0)

    for i, layer in enumerate(model.decoder.layers):
        experts = layer.mlp.experts.local_experts
        want = [torch.cat([e.linear_fc1.weight.flatten(), e.linear_fc2.weight.flatten()]).norm()
                for e in experts]
        torch.testing.assert_close(got.experts[i], torch.stack(want), rtol=1e-5, atol=0)
        torch.testing.assert_close(got.expert_ffn[i], sum(neurons(e) for e in experts).float(),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(got.expert_channels[i],
                                   torch.stack([neurons(e) for e in experts]).float(),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(got.shared_expert_ffn[i],
                                   neurons(layer.mlp.shared_experts).float(), rtol=1e-5, atol=0)
    rand = random_scores(cfg, seed=0)
    assert (rand.experts.shape, rand.expert_ffn.shape, rand.shared_expert_ffn.shape,
            rand.expert_channels.shape) == ((2, 5), (2, 24), (2, 40), (2, 5, 24))


def scores_job(out: str, tp: int, pp: int, ckpt: str) -> None:
    """Scores of the planted model under TP=tp, PP=pp (DP: the rest of the processes, each
    with its share of the calibration sequences)."""
    from nemo_minitron.checkpoint.io import load_weights, save_checkpoint
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.importance.estimator import estimate_importance
    from nemo_minitron.model.build import build_model, unwrap
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp,
                                    pipeline_model_parallel_size=pp), seed=11)
    cfg = ModelConfig(**CFG)
    model = build_model(cfg)
    first = torch.distributed.get_world_size() == 1  # the one-process reference
    if first:
        _plant(unwrap(model))
        save_checkpoint(ckpt, model, model_cfg=cfg, tokenizer=None)
    else:
        load_weights(ckpt, model)
    inputs: dict[int, list[torch.Tensor]] = {}
    layers = unwrap(model).decoder.layers
    handles = [layer.pre_mlp_layernorm.register_forward_hook(
        lambda _m, _a, y, i=i: inputs.setdefault(i, []).append(y.detach().clone()))
        for i, layer in enumerate(layers)]
    from megatron.core import parallel_state as ps

    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tokens = tokens[rank * 8 // dp:(rank + 1) * 8 // dp]
    scores = estimate_importance(model, tokens, micro_batch_size=4 // dp)
    for handle in handles:
        handle.remove()
    result = {f: getattr(scores, f) for f in FIELDS}
    if first:
        _check_baselines(model, cfg)
        from nemo_minitron.importance.scores import Scores

        scores.save(out + ".scores")  # the MoE axes are saved and read back
        back = Scores.load(out + ".scores")
        for f in FIELDS:
            assert torch.equal(getattr(back, f), getattr(scores, f)), f
        ref = [_reference(layer.mlp, torch.cat(inputs[i], 1)) for i, layer in enumerate(layers)]
        result["reference"] = {k: torch.stack([r[k] for r in ref]).float() for k in ref[0]}
    if int(os.environ["RANK"]) == 0:
        torch.save(result, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("moe_scores")
    ckpt = str(d / "ck")
    spawn(scores_job, 1, str(d / "tp1.pt"), 1, 1, ckpt)
    spawn(in_order, 2, [(scores_job, (str(d / "tp2.pt"), 2, 1, ckpt)),
                        (scores_job, (str(d / "pp2.pt"), 1, 2, ckpt)),
                        (scores_job, (str(d / "dp2.pt"), 1, 1, ckpt))])
    return d


@pytest.mark.dist
def test_planted_experts_and_scores_equal_a_torch_recomputation(runs):
    got = torch.load(runs / "tp1.pt")
    ref = got.pop("reference")
    for name, want in ref.items():
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)
    experts, mass, load = got["experts"], got["expert_mass"], got["expert_load"]
    assert experts.shape == mass.shape == (2, 5) and got["expert_ffn"].shape == (2, 24)
    assert got["shared_expert_ffn"].shape == (2, 40)
    assert got["expert_channels"].shape == (2, 5, 24)
    assert (got["expert_channels"][:, NEVER] == 0).all()  # never routed: no activation
    # the layer's channel score is the root of the experts' summed squares
    torch.testing.assert_close(got["expert_channels"].pow(2).sum(1).sqrt(), got["expert_ffn"])
    assert (experts[:, ZEROED] == 0).all() and (mass[:, ZEROED] > 0.05).all()
    assert (mass[:, NEVER] == 0).all() and (load[:, NEVER] == 0).all()
    others = [e for e in range(5) if e not in (ZEROED, NEVER)]
    assert (experts[:, others] > 0).all()
    torch.testing.assert_close(load.sum(1), torch.full((2,), 2.0))  # top-2: two per token


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_moe_scores_are_the_same_under_tp2_pp2_and_dp2(runs, layout):
    ref, got = torch.load(runs / "tp1.pt"), torch.load(runs / f"{layout}.pt")
    for name in FIELDS:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")

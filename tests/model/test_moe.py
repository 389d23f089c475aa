"""Mixture-of-experts models built by ``model.build``: megatron-core's MoE layer against a
torch-only recomputation of the same weights (router softmax and top-k, experts, weighted sum,
gated shared expert), its load-balancing loss in the gradient, and the router-GEMM shim that
megatron-core 0.16.1 needs without Transformer Engine."""

from __future__ import annotations

import pytest
import torch

from tests.dist import in_order, spawn
from tests.helpers.layouts import logits_job
from tests.helpers.moe import moe_output, router_losses

MOE = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
           vocab_size=64, seq_length=16, num_moe_experts=4, moe_router_topk=2,
           moe_ffn_hidden_size=24)
LAYOUT = {**MOE, "moe_shared_expert_intermediate_size": 32}
"""The layout tests' model: a shared expert too."""


def reference_moe(mlp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output, switch loss)`` of ``mlp`` (megatron-core's ``MoELayer``) on ``x`` [s, b, h],
    recomputed from its weights with torch alone."""
    h = x.reshape(-1, x.shape[-1])
    switch, _ = router_losses(mlp.router.weight, h, mlp.config.moe_router_topk,
                              mlp.config.moe_router_pre_softmax)
    return moe_output(mlp, h).reshape(x.shape), switch


def moe_layer_job(pre_softmax: bool, shared: int | None) -> None:
    from megatron.core.transformer.moe import moe_utils

    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.config.moe import MOE_FIELDS
    from nemo_minitron.model.build import build_model, unwrap
    from nemo_minitron.model.params import count_params
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(), seed=3)
    cfg = ModelConfig(**MOE, moe_router_pre_softmax=pre_softmax, moe_aux_loss_coeff=0.1,
                      moe_shared_expert_intermediate_size=shared,
                      moe_shared_expert_gate=shared is not None,
                      qk_layernorm=shared is not None)  # counted by count_params below
    model = unwrap(build_model(cfg))
    # The TransformerConfig we build from maps back to the same MoE fields.
    back = ModelConfig.from_transformer_config(model.config, vocab_size=64, seq_length=16)
    assert {f: getattr(back, f) for f in MOE_FIELDS} == {f: getattr(cfg, f) for f in MOE_FIELDS}
    mlp = model.decoder.layers[0].mlp
    # Parameter counts: the built model's, and one token's (all but E - k experts per layer).
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in mlp.experts.local_experts[0].parameters())
    assert count_params(cfg) == total
    assert count_params(cfg, active=True) == total - cfg.num_layers * (4 - 2) * expert
    with torch.no_grad():  # a router that does not favour one expert for every token
        mlp.router.weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    x = torch.randn(8, 2, 32, generator=torch.Generator().manual_seed(0))
    probe = torch.randn(8, 2, 32, generator=torch.Generator().manual_seed(2))
    mlp.train()
    got, _ = mlp(x)
    (got * probe).sum().backward()
    want, aux = reference_moe(mlp, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # The load-balancing loss is in the gradient: the router's is that of probe.out + c * aux.
    router = mlp.router.weight
    ref = torch.autograd.grad((want * probe).sum() + 0.1 * aux, router, retain_graph=True)[0]
    torch.testing.assert_close(router.grad, ref, rtol=0, atol=1e-5)
    no_aux = torch.autograd.grad((want * probe).sum(), router)[0]
    assert (router.grad - no_aux).abs().max() > 1e-4
    logged = moe_utils.get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
    torch.testing.assert_close(logged[0], aux.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("pre_softmax,shared", [(False, None), (True, 40)])
def test_moe_layer_equals_a_torch_recomputation_with_its_aux_loss(pre_softmax, shared):
    spawn(moe_layer_job, 1, pre_softmax, shared)


def unshimmed_job() -> None:
    from megatron.core.transformer.moe import moe_utils

    from nemo_minitron.model.moe import ensure_router_gemm

    # megatron-core 0.16.1 without Transformer Engine: the router reads a name never defined.
    # When this fails megatron-core has fixed it, and model/moe.py's shim can go.
    assert not hasattr(moe_utils, "te_general_gemm")
    ensure_router_gemm()
    assert moe_utils.te_general_gemm is None


def test_router_gemm_shim_is_still_needed():
    spawn(unshimmed_job, 1)


@pytest.mark.dist
def test_moe_tp2_pp2_ep2_equal_tp1_and_checkpoints_reshard(tmp_path):
    def p(name: str) -> str:
        return str(tmp_path / name)

    spawn(in_order, 2, [(logits_job, (p("tp2.pt"), LAYOUT, 2, 1, None, p("ck_tp2"))),
                        (logits_job, (p("pp2.pt"), LAYOUT, 1, 2, None, p("ck_pp2"))),
                        (logits_job, (p("ep2.pt"), LAYOUT, 1, 1, None, p("ck_ep2"), 2))])
    spawn(in_order, 1, [(logits_job, (p("tp1.pt"), LAYOUT, 1, 1, None, p("ck_tp1"))),
                        (logits_job, (p("from_tp2.pt"), LAYOUT, 1, 1, p("ck_tp2"), None)),
                        (logits_job, (p("from_pp2.pt"), LAYOUT, 1, 1, p("ck_pp2"), None)),
                        (logits_job, (p("from_ep2.pt"), LAYOUT, 1, 1, p("ck_ep2"), None))])
    spawn(in_order, 2, [(logits_job, (p("tp2_from_tp1.pt"), LAYOUT, 2, 1, p("ck_tp1"), None)),
                        (logits_job, (p("pp2_from_tp1.pt"), LAYOUT, 1, 2, p("ck_tp1"), None)),
                        (logits_job, (p("ep2_from_tp1.pt"), LAYOUT, 1, 1, p("ck_tp1"), None, 2))])
    ref = torch.load(p("tp1.pt"))
    assert ref.shape == (4, 16, 64)
    # TP=2 draws the same weights as TP=1 (CPU initialisation); PP=2 and EP=2 (experts from
    # the expert-parallel RNG) draw their own, so they run TP=1's checkpoint, and their own
    # checkpoints run under TP=1.
    for name, want in (("tp2", ref), ("from_tp2", ref), ("tp2_from_tp1", ref),
                       ("pp2_from_tp1", ref), ("from_pp2", torch.load(p("pp2.pt"))),
                       ("ep2_from_tp1", ref), ("from_ep2", torch.load(p("ep2.pt")))):
        torch.testing.assert_close(torch.load(p(f"{name}.pt")), want, atol=1e-5, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_bench_flops_count_the_experts_a_token_runs():
    # An MoE layer's matmuls per token: its router and top-k experts, i.e. a dense MLP of k
    # times the expert width plus the router (E x h); the total parameters count all experts.
    from nemo_minitron.config import ModelConfig
    from nemo_minitron.eval.bench import flops_per_token
    from nemo_minitron.model.params import count_params

    moe = ModelConfig(**MOE)
    dense = ModelConfig(**{k: v for k, v in MOE.items() if not k.startswith(("moe", "num_moe"))
                           } | {"ffn_hidden_size": 2 * 24})
    router = 2 * moe.num_layers * 4 * moe.hidden_size
    assert flops_per_token(moe, 100.0) == flops_per_token(dense, 100.0) + router
    assert count_params(moe, active=True) == count_params(dense) + router // 2
    assert count_params(moe) == count_params(moe, active=True) + moe.num_layers * 2 * (
        3 * 24 * moe.hidden_size)  # two more experts of SwiGLU width 24 per layer

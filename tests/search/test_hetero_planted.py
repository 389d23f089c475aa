"""Planted heterogeneous search and per-layer pruning, in one spawned 2-process job: layers with
different numbers of inert MLP neurons and query groups; block scores on the parent + the exact
solver under the planted shape's parameter count find exactly that shape; pruning to it keeps
the logits (1e-5) in a real heterogeneous GPTModel, at TP=1, TP=2 and PP=2. Shapes with linear,
no-op and regrouped (not inert) blocks: the pruned model equals the parent with the same
blocks replaced by hooks (``search.blocks.replaced``: another computation of the same
blocks), and at TP=2 and PP=2 equals TP=1."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import pytest
import torch

from nemo_minitron.config.hetero import LayerShape
from tests.dist import in_order, spawn
from tests.helpers.hetero_search import plant

PLANTED = [LayerShape(num_query_groups=2, ffn_hidden_size=48),
           LayerShape(num_query_groups=4, ffn_hidden_size=32)]
OTHERS = {"linear": [LayerShape(attention="linear", ffn_hidden_size=16),
                     LayerShape(num_query_groups=2, mlp="linear")],
          "no_op": [LayerShape(attention="no_op", mlp="no_op"),
                    LayerShape(num_query_groups=1, ffn_hidden_size=48)],
          "distilled": [LayerShape(), LayerShape(ffn_hidden_size=16)]}


CFG = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
           num_query_groups=4, kv_channels=8, seq_length=16, vocab_size=128)


def _model(full: dict[str, torch.Tensor] | None = None):
    """The planted parent (at TP>1: filled from the TP=1 parent's ``full`` weights)."""
    from nemo_minitron.config import ModelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.full_state import fill_model
    from nemo_minitron.model.layouts import layer_key

    cfg = ModelConfig(**CFG)
    model = build_model(cfg)
    if full is None:
        plant(model, cfg)
    else:
        fill_model(model, cfg, lambda name, layer: full[name if layer is None
                                                        else layer_key(layer, name)])
    return model, cfg


def _simulated(model, cfg, importance, shapes, linear, tokens, trained=None):
    """The parent's logits with every non-parent block of ``shapes`` replaced by hooks."""
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.search.blocks import replaced

    with contextlib.ExitStack() as stack:
        het = dataclasses.replace(cfg, layer_shapes=shapes)
        for i in range(cfg.num_layers):
            s = het.layer_shape(i)
            for sub, opt in (("attention", (s.attention, s.num_query_groups)),
                             ("mlp", (s.mlp, s.ffn_hidden_size))):
                if opt not in (("full", cfg.query_groups if sub == "attention"
                                else cfg.ffn_hidden_size),):
                    stack.enter_context(replaced(model, cfg, importance, i, sub, opt, linear,
                                                 trained))
        return forward_logits(model, tokens)


def tp1_job(out: str) -> None:
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.importance.estimator import estimate_importance
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.model.params import count_params
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.prune.apply import prune_model
    from nemo_minitron.prune.hetero import distill_mlp_blocks, fit_linear_blocks
    from nemo_minitron.prune.plan import Target, make_plan
    from nemo_minitron.search.blocks import (
        BlockLibrary,
        MemoryBudget,
        kept_neurons,
        layer_cost,
        layer_library,
        layer_memory,
        score_blocks,
        sublayer_options,
    )
    from nemo_minitron.search.enumerate import SearchConfig
    from nemo_minitron.search.hetero import choose_shapes, make_budget

    init_distributed(ParallelConfig(), seed=3)
    model, cfg = _model()
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 128, (8, 16), generator=gen)
    tokens = torch.randint(0, 128, (4, 16), generator=gen)
    importance = estimate_importance(model, calib, micro_batch_size=4)
    linear = fit_linear_blocks(model, calib, 4, [(i, s) for i in range(2)
                                                 for s in ("attention", "mlp")], bias=False)
    options = sublayer_options(cfg, BlockLibrary(), tp=2)
    scores = score_blocks(model, cfg, importance, options, tokens, 4, linear)
    lib = layer_library(cfg, options, scores)
    budget = count_params(dataclasses.replace(cfg, layer_shapes=PLANTED))
    found = choose_shapes(cfg, lib, make_budget(cfg, SearchConfig(target_params=budget)))
    # The same under a memory budget (weights + KV cache): the planted shape's bytes.
    m = MemoryBudget(batch_size=4, context=64)
    planted_bytes = ((count_params(cfg) - 2 * layer_cost(cfg, LayerShape())) * 2
                     + sum(layer_memory(cfg, x, m) for x in PLANTED))
    mem = make_budget(cfg, SearchConfig(
        mode="heterogeneous", budget="memory",
        memory=dataclasses.replace(m, target_gib=(planted_bytes + 0.5) / 1024**3)))
    found_memory = choose_shapes(cfg, layer_library(cfg, options, scores, mem.cost), mem)
    parent = forward_logits(model, tokens)
    result = {"found": found, "found_memory": found_memory, "budget": budget, "parent": parent,
              "plans": {}, "logits": {}, "simulated": {}, "full": {k: v.detach().clone()
                                        for k, v in model.named_parameters()}}
    # Blockwise local distillation of layer 1's MLP cut to 16 neurons (16 of them live).
    kept = kept_neurons(cfg, importance, 1, 16)
    bld = distill_mlp_blocks(model, cfg, calib, 4, {"b": (1, kept)}, steps=100)["b"]
    result["bld"] = {"kept": kept, "weights": bld}
    for name, shapes in {"planted": found, **OTHERS}.items():
        plan = make_plan(cfg, importance, Target(layer_shapes=shapes))
        plan.linear = linear
        if name == "distilled":
            plan.trained = {1: bld}
        pruned = prune_model(model, plan)
        result["plans"][name] = plan
        result["logits"][name] = forward_logits(pruned, tokens)
        result["simulated"][name] = _simulated(model, cfg, importance, shapes, linear, tokens,
                                               {(1, 16): bld})
        result.setdefault("counts", {})[name] = (
            sum(p.numel() for p in pruned.parameters()), count_params(plan.config))
    captured = []
    hook = model.decoder.layers[1].pre_mlp_layernorm.register_forward_hook(
        lambda m, a, o: captured.append(o.detach().clone()))
    forward_logits(model, calib, 4)
    hook.remove()
    result["mlp_in_1"] = torch.cat(captured, dim=0)
    # Both ranks of the spawn compute this; one writes (whole, then renamed) and both wait for
    # it, so the next job of the other rank never reads a file still being written.
    if torch.distributed.get_rank() == 0:
        torch.save({**result, "tokens": tokens, "calib": calib, "linear": linear}, out + ".tmp")
        os.replace(out + ".tmp", out)
    torch.distributed.barrier()


def parallel_job(tp1: str, out: str, layout: dict[str, int]) -> None:
    """The TP=1 plans applied under ``layout`` (2 processes); the last stage's rank 1 saves."""
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.prune.apply import prune_model
    from nemo_minitron.prune.hetero import fit_linear_blocks

    r = torch.load(tp1, weights_only=False)
    init_distributed(ParallelConfig(**layout), seed=3)
    model, _ = _model(r["full"])
    logits = {name: forward_logits(prune_model(model, r["plans"][name]), r["tokens"])
              for name in ("planted", "linear")}
    # The least-squares fits under this layout (each stage fits its own layers).
    logits["fits"] = fit_linear_blocks(model, r["calib"], 4, [(i, s) for i in range(2) for s in
                                                              ("attention", "mlp")], False)
    if torch.distributed.get_rank() == 1:
        torch.save(logits, out)


def _hidden_in(planted: dict, layer: int) -> torch.Tensor:
    """The MLP input (pre-MLP norm output) of ``layer`` on the calibration tokens."""
    assert layer == 1
    return planted["mlp_in_1"].reshape(-1, 32)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    d = Path(tmp_path_factory.mktemp("hetero"))
    tp1 = str(d / "tp1.pt")
    spawn(in_order, 2, [(tp1_job, (tp1,)),
                        *((parallel_job, (tp1, str(d / f"{k}.pt"), {k: 2}))
                          for k in ("tensor_model_parallel_size",
                                    "pipeline_model_parallel_size"))])
    return {**torch.load(tp1, weights_only=False),
            "tp2": torch.load(d / "tensor_model_parallel_size.pt", weights_only=False),
            "pp2": torch.load(d / "pipeline_model_parallel_size.pt", weights_only=False)}


@pytest.mark.dist
def test_search_finds_the_planted_shape(planted) -> None:
    assert planted["found"] == PLANTED
    assert planted["found_memory"] == PLANTED
    torch.testing.assert_close(planted["logits"]["planted"], planted["parent"], atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(planted["tp2"]["planted"], planted["parent"], atol=1e-5, rtol=0)


@pytest.mark.dist
def test_local_distillation_fits_the_block_better(planted) -> None:
    """The distilled block reproduces the source MLP's output better than the cut one, on the
    calibration activations recomputed here with torch from the saved weights."""
    import torch.nn.functional as F

    full, kept = planted["full"], planted["bld"]["kept"]
    p = "decoder.layers.1."
    h = _hidden_in(planted, 1)
    fc1, fc2 = full[p + "mlp.linear_fc1.weight"], full[p + "mlp.linear_fc2.weight"]

    def mlp(x, w1, w2):
        gate, up = (x @ w1.T).chunk(2, -1)
        return (F.silu(gate) * up) @ w2.T
    want = mlp(h, fc1, fc2)
    cut = mlp(h, torch.cat([fc1[kept], fc1[kept + 64]]), fc2[:, kept])
    w = planted["bld"]["weights"]
    trained = mlp(h, w["mlp.linear_fc1.weight"], w["mlp.linear_fc2.weight"])
    after, before = F.mse_loss(trained, want), F.mse_loss(cut, want)
    assert after < 0.75 * before, (after, before)


@pytest.mark.dist
def test_linear_fits_under_tp_and_pp(planted) -> None:
    for layout, layers in (("tp2", (0, 1)), ("pp2", (1,))):  # PP: the last stage's layer
        fits = planted[layout]["fits"]
        assert sorted(fits) == [f"{i}.{s}" for i in layers for s in ("attention", "mlp")]
        for key, fit in fits.items():
            torch.testing.assert_close(fit["weight"], planted["linear"][key]["weight"],
                                       atol=1e-5, rtol=1e-4)


@pytest.mark.dist
@pytest.mark.parametrize("name", ["planted", "linear", "no_op"])
def test_pruned_model_computes_the_blocks(planted, name) -> None:
    have, predicted = planted["counts"][name]
    assert have == predicted
    if name != "planted":  # these blocks change the logits: the comparison below is not idle
        assert (planted["logits"][name] - planted["parent"]).abs().max() > 1e-3
    torch.testing.assert_close(planted["logits"][name], planted["simulated"][name], atol=1e-5,
                               rtol=0)
    for layout in ("tp2", "pp2"):
        if name in planted[layout]:
            torch.testing.assert_close(planted[layout][name], planted["logits"][name],
                                       atol=1e-5, rtol=0)

"""Block scores of the heterogeneous search on the parent (``search.blocks``): planted inert
units score zero, every other block's score equals the KL of an independent edit of the
parent's weights that computes the same block, and the linear replacement's fit equals
``torch.linalg.lstsq`` on the same activations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist import spawn
from tests.helpers.hetero_search import plant


def _kl(parent: torch.Tensor, logits: torch.Tensor) -> float:
    p, q = torch.log_softmax(parent.double(), -1), torch.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _activations(model, calib: torch.Tensor) -> tuple[dict, dict]:
    """Each sublayer's input (its norm's output) and output, captured by plain hooks."""
    from nemo_minitron.model.forward import forward_logits

    cap: dict[tuple[int, str], list[torch.Tensor]] = {}

    def grab(key):
        return lambda m, a, o: cap.setdefault(key, []).append(
            (o[0] if isinstance(o, tuple) else o).detach().clone())  # later work in place
    hooks = []
    for i, lay in enumerate(model.decoder.layers):
        for mod, key in ((lay.input_layernorm, "xa"), (lay.self_attention, "ya"),
                         (lay.pre_mlp_layernorm, "xm"), (lay.mlp, "ym")):
            hooks.append(mod.register_forward_hook(grab((i, key))))
    forward_logits(model, calib, 4)
    for h in hooks:
        h.remove()
    xs, ys = {}, {}
    for (i, k), v in cap.items():
        (xs if k[0] == "x" else ys)[(i, k[1])] = torch.cat(v).reshape(-1, 32).double()
    return xs, ys


def blocks_job(out: str) -> None:
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.importance.estimator import estimate_importance
    from nemo_minitron.model import layouts
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.prune.hetero import fit_linear_blocks
    from nemo_minitron.prune.plan import Target, make_plan
    from nemo_minitron.search.blocks import (
        BlockLibrary,
        layer_shape,
        score_blocks,
        sublayer_options,
    )

    init_distributed(ParallelConfig(), seed=3)
    cfg = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                      num_query_groups=4, kv_channels=8, seq_length=16, vocab_size=128)
    model = build_model(cfg)
    plant(model, cfg)
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 128, (8, 16), generator=gen)
    tokens = torch.randint(0, 128, (4, 16), generator=gen)
    importance = estimate_importance(model, calib, micro_batch_size=4)
    options = sublayer_options(cfg, BlockLibrary(), tp=1)
    linear = fit_linear_blocks(model, calib, 4, [(i, s) for i in range(2)
                                                 for s in ("attention", "mlp")], bias=False)
    scores = score_blocks(model, cfg, importance, options, tokens, 2, linear)

    # Independent references: the same block made by editing a copy of the parent's weights.
    parent = forward_logits(model, tokens)
    ref: dict[str, list[list[float]]] = {"attention": [], "mlp": []}
    for i in range(2):
        for sub in ("attention", "mlp"):
            row = []
            for opt in options[sub]:
                saved = [p.detach().clone() for p in model.parameters()]
                layer = model.decoder.layers[i]
                shapes = [layer_shape(("full", None), ("full", None)) for _ in range(2)]
                shapes[i] = layer_shape(opt, ("full", None)) if sub == "attention" \
                    else layer_shape(("full", None), opt)
                plan = make_plan(cfg, importance, Target(layer_shapes=shapes))
                with torch.no_grad():
                    if opt[0] == "no_op":  # the sublayer's output projection zero
                        w = layer.self_attention.linear_proj.weight if sub == "attention" \
                            else layer.mlp.linear_fc2.weight
                        w.zero_()
                    elif opt[0] == "linear":
                        row.append(None)
                        continue
                    elif sub == "mlp":  # removed neurons: their fc2 columns zero
                        gone = sorted(set(range(64)) - set(plan.kept_ffn[i].tolist()))
                        layer.mlp.linear_fc2.weight[:, gone] = 0
                    else:  # each head's q with its host's k/v: copy the host's k/v rows
                        qkv = layer.self_attention.linear_qkv.weight
                        orig = qkv.clone()
                        for grp, heads in zip(plan.kept_groups[i].tolist(),
                                              plan.kept_heads[i].tolist()):
                            for h in heads:
                                own = h  # one head per group in the source
                                qkv[layouts.qkv_kv_rows(cfg, own)] = \
                                    orig[layouts.qkv_kv_rows(cfg, grp)]
                row.append(_kl(parent, forward_logits(model, tokens)))
                with torch.no_grad():  # back to the parent
                    for p, w in zip(model.parameters(), saved):
                        p.copy_(w)
            ref[sub].append(row)
    xs, ys = _activations(model, calib)
    fits = {k: torch.linalg.lstsq(xs[k], ys[k]).solution.T for k in xs}
    torch.save({"options": options, "scores": scores, "ref": ref, "fits": fits,
                "linear": linear}, out)


@pytest.fixture(scope="module")
def blocks(tmp_path_factory) -> dict:
    out = Path(tmp_path_factory.mktemp("blocks")) / "r.pt"
    spawn(blocks_job, 1, str(out))
    return torch.load(out, weights_only=False)


def test_planted_blocks_score_zero(blocks) -> None:
    opts, s = blocks["options"], blocks["scores"]
    assert opts["mlp"][:4] == [("full", 64), ("full", 48), ("full", 32), ("full", 16)]
    assert opts["attention"][:2] == [("full", 4), ("full", 2)]
    # A random tiny model: a real removal moves the KL by ~1e-7, an inert one by rounding.
    inert, real = 1e-12, 1e-8
    # Layer 0: 16 inert neurons, 2 inert groups; layer 1: 32 inert neurons, no inert group.
    assert s["mlp"][0][1] < inert < real < s["mlp"][0][2], s["mlp"]
    assert max(s["mlp"][1][1:3]) < inert < real < s["mlp"][1][3], s["mlp"]
    assert s["attention"][0][1] < inert < real < s["attention"][1][1], s["attention"]
    assert min(s[sub][i][j] for sub in s for i in range(2)
               for j, o in enumerate(opts[sub]) if o[0] != "full") > real, s


def test_block_scores_equal_edited_weights(blocks) -> None:
    for sub, rows in blocks["ref"].items():
        for i, row in enumerate(rows):
            for j, want in enumerate(row):
                if want is not None:
                    assert blocks["scores"][sub][i][j] == pytest.approx(want, rel=1e-4,
                                                                        abs=1e-9), (sub, i, j)


def test_linear_fit_is_least_squares(blocks) -> None:
    for (i, sub), want in blocks["fits"].items():
        have = blocks["linear"][f"{i}.{'attention' if sub == 'a' else 'mlp'}"]["weight"]
        torch.testing.assert_close(have.double(), want, atol=1e-5, rtol=1e-4)

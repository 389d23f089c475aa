"""Pruning under TP=2 and PP=2 gives the TP=1 pruned model (scores and logits), the pruned
checkpoint loads under another layout, and the Python API works from a user's own forward loop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.dist import in_order, spawn

CFG = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
           num_query_groups=4, seq_length=32, vocab_size=256)
# Every axis at once; 2 layers and 2 groups stay divisible by PP=2 and TP=2.
TARGET = dict(num_layers=2, hidden_size=48, ffn_hidden_size=64, num_query_groups=2,
              hardware_multiple=1)


TIED = [False, True]


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(11))


def prune_job(out: str, tp: int, pp: int, tied: bool, ckpt_in: str | None,
              ckpt_out: str | None, pruned_out: str | None) -> None:
    from nemo_minitron.checkpoint.io import load_weights, save_checkpoint
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.importance.estimator import estimate_importance
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.prune.apply import prune_model
    from nemo_minitron.prune.plan import Target, make_plan

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp,
                                    pipeline_model_parallel_size=pp), seed=4)
    cfg = ModelConfig(**CFG, share_embeddings_and_output_weights=tied)
    model = build_model(cfg)
    if ckpt_in:
        load_weights(ckpt_in, model)
    if ckpt_out:
        save_checkpoint(ckpt_out, model, model_cfg=cfg, tokenizer=None)
    scores = estimate_importance(model, _tokens(), micro_batch_size=4)
    plan = make_plan(cfg, scores, Target(**TARGET), tp, pp)
    pruned = prune_model(model, plan)
    logits = forward_logits(pruned, _tokens(), micro_batch_size=4)
    if pruned_out:
        save_checkpoint(pruned_out, pruned, model_cfg=plan.config, tokenizer=None)
    if logits is not None and int(os.environ["RANK"]) == torch.distributed.get_world_size() - 1:
        torch.save({"logits": logits, "ffn": scores.ffn, "layers": plan.kept_layers,
                    "fingerprint": scores.meta["fingerprint"],
                    "local_params": sum(p.numel() for p in pruned.parameters())}, out)


def load_pruned_job(out: str, tp: int, ckpt: str) -> None:
    from nemo_minitron.checkpoint.io import load_model_config, load_weights
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp), seed=4)
    model = build_model(load_model_config(ckpt))
    load_weights(ckpt, model)
    logits = forward_logits(model, _tokens(), micro_batch_size=4)
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": logits}, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every layout, tied and untied, three start-ups in all: the one-process reference (and
    its checkpoint), the 2-process layouts loading it, the TP=2 pruned checkpoint under TP=1."""
    d = tmp_path_factory.mktemp("prune-layouts")

    def p(name: str) -> str:
        return str(d / name)

    spawn(in_order, 1, [(prune_job, (p(f"ref-{t}.pt"), 1, 1, t, None, p(f"ck-{t}"), None))
                        for t in TIED])
    spawn(in_order, 2, [
        job for t in TIED for job in (
            (prune_job, (p(f"tp2-{t}.pt"), 2, 1, t, p(f"ck-{t}"), None, p(f"pruned-{t}"))),
            (prune_job, (p(f"pp2-{t}.pt"), 1, 2, t, p(f"ck-{t}"), None, None)))])
    spawn(load_pruned_job, 1, p("reload.pt"), 1, p("pruned-False"))
    return d


@pytest.mark.dist
@pytest.mark.parametrize("tied", TIED, ids=["untied", "tied"])
def test_pruning_under_tp2_and_pp2_equals_tp1(runs, tied):
    ref = torch.load(runs / f"ref-{tied}.pt")
    assert ref["logits"].shape == (8, 32, 256)
    for name in ("tp2", "pp2"):
        got = torch.load(runs / f"{name}-{tied}.pt")
        assert got["layers"] == ref["layers"], name
        assert got["fingerprint"] == pytest.approx(ref["fingerprint"], rel=1e-9), name
        torch.testing.assert_close(got["ffn"], ref["ffn"], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-5, rtol=0, msg=name)
    # Balanced shards: under TP=2 the sharded weights split evenly, so a rank holds less than
    # the whole pruned model.
    assert torch.load(runs / f"tp2-{tied}.pt")["local_params"] < ref["local_params"]
    if not tied:  # the TP=2 pruned checkpoint loads under TP=1 with the same logits
        torch.testing.assert_close(torch.load(runs / "reload.pt")["logits"], ref["logits"],
                                   atol=1e-5, rtol=0)


def user_loop_job(out: str) -> None:
    """What a user's own Megatron script does: its own forward loop inside the estimator."""
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.importance.estimator import ImportanceEstimator, estimate_importance
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.prune.apply import prune_model
    from nemo_minitron.prune.plan import Target, make_plan

    init_distributed(ParallelConfig(), seed=4)
    cfg = ModelConfig(**CFG)
    model = build_model(cfg)
    tokens = _tokens()
    model.eval()
    with ImportanceEstimator(model) as est, torch.no_grad():
        for chunk in tokens.split(2):  # the user's own batching and forward call
            pos = torch.arange(chunk.shape[1]).unsqueeze(0).expand_as(chunk)
            model(chunk, pos, None)
    mine = est.finalize()
    ours = estimate_importance(model, tokens, micro_batch_size=4)
    pruned = prune_model(model, make_plan(cfg, mine, Target(**TARGET)))
    torch.save({"mine": mine, "ours": ours,
                "params": sum(p.numel() for p in pruned.parameters())}, out)


def test_python_api_with_a_users_own_forward_loop(tmp_path):
    spawn(user_loop_job, 1, str(tmp_path / "r.pt"))
    r = torch.load(tmp_path / "r.pt", weights_only=False)
    from nemo_minitron.importance.scores import Scores

    for axis in Scores.AXES:
        torch.testing.assert_close(getattr(r["mine"], axis), getattr(r["ours"], axis),
                                   rtol=1e-5, atol=1e-6, msg=axis)
    assert r["mine"].meta["num_sequences"] == 8
    from nemo_minitron.config import ModelConfig
    from nemo_minitron.model.params import count_params

    expected = ModelConfig(**{**CFG, "num_layers": 2, "hidden_size": 48, "ffn_hidden_size": 64,
                              "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 8})
    assert r["params"] == count_params(expected)


def stock_job(out: str) -> None:
    """A stock GPTModel with megatron-core's default learned positions: refused when its config
    says RoPE (the parameter counts differ), pruned when described right."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    import nemo_minitron as nm
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.params import count_params
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(), seed=4)
    tc = TransformerConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128,
                           num_attention_heads=4, normalization="RMSNorm",
                           gated_linear_unit=True, activation_func=F.silu,
                           add_bias_linear=False, use_cpu_initialization=True)
    model = GPTModel(config=tc, transformer_layer_spec=get_gpt_layer_local_spec(
        normalization="RMSNorm"), vocab_size=256, max_sequence_length=32)
    scores = nm.estimate_importance(model, _tokens())
    target = nm.Target(hidden_size=32, hardware_multiple=1)
    wrong = nm.ModelConfig.from_transformer_config(tc, vocab_size=256, seq_length=32)
    try:
        nm.prune(model, nm.make_plan(wrong, scores, target))
        refused = ""
    except nm.ConfigError as e:
        refused = str(e)
    right = nm.ModelConfig.from_transformer_config(
        tc, vocab_size=256, seq_length=32, position_embedding_type="learned_absolute")
    plan = nm.make_plan(right, scores, target)
    pruned = nm.prune(model, plan)
    torch.save({"refused": refused, "params": sum(p.numel() for p in pruned.parameters()),
                "want": count_params(plan.config)}, out)


def test_a_config_that_is_not_the_models_is_refused(tmp_path):
    spawn(stock_job, 1, str(tmp_path / "r.pt"))
    r = torch.load(tmp_path / "r.pt")
    assert "position_embedding_type='rope'" in r["refused"], r["refused"]
    assert r["params"] == r["want"]

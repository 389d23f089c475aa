"""``nm.prune`` on a user's own megatron-core ``GPTModel`` (megatron-core's
``get_gpt_layer_local_spec()``, no nemo_minitron model code) loaded with a CLI checkpoint's
weights: the same logits as the checkpoint that ``nemo-minitron prune`` writes from the same
scores, loaded into the same stock model, at TP=1, TP=2 and PP=2; the model that comes back is
of the user's class, built from the user's spec, with the user's other config fields."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.cli import run_cli
from tests.dist import in_order, spawn

TARGET = dict(num_layers=2, hidden_size=48, ffn_hidden_size=64, num_attention_heads=2,
              hardware_multiple=16)
STD = 0.0123  # a TransformerConfig field the user set that pruning must keep
LAYOUTS = [(1, 1), (2, 1), (1, 2)]


def _tokens() -> torch.Tensor:
    return torch.randint(0, 500, (4, 24), generator=torch.Generator().manual_seed(3))


def stock_model(ckpt: str, cls: type | None = None, **extra):
    """The user's model for a checkpoint's shape, written with plain megatron-core calls."""
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from nemo_minitron.checkpoint.io import load_model_config, load_weights

    cfg = load_model_config(ckpt)
    assert cfg.activation == "swiglu" and cfg.position_embedding_type == "rope"
    tc = TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups, kv_channels=cfg.head_dim,
        normalization=cfg.normalization, layernorm_epsilon=cfg.layernorm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=STD,
        use_cpu_initialization=True, bias_activation_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size())
    model = (cls or GPTModel)(
        config=tc, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=cfg.vocab_size, max_sequence_length=cfg.context_length,
        position_embedding_type="rope", rotary_base=cfg.rotary_base,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        **extra)
    load_weights(ckpt, model)
    return model, cfg


def scores_job(out: str, teacher: str) -> None:
    import nemo_minitron as nm
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(), seed=4)
    model, _ = stock_model(teacher)
    nm.estimate_importance(model, _tokens()).save(out)


def user_job(out: str, teacher: str, scores: str, cli_pruned: str, tp: int, pp: int) -> None:
    from megatron.core.models.gpt import GPTModel

    import nemo_minitron as nm
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.model.params import weights_fingerprint
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp,
                                    pipeline_model_parallel_size=pp), seed=4)
    model, cfg = stock_model(teacher)
    before = weights_fingerprint(model)
    plan = nm.make_plan(cfg, nm.Scores.load(scores), nm.Target(**TARGET), tp, pp)
    pruned = nm.prune(model, plan)
    ref, _ = stock_model(cli_pruned)
    r = {"class": type(pruned).__name__, "is_gpt": type(pruned) is GPTModel,
         "modules": [type(m).__name__ for m in pruned.decoder.layers[0].modules()],
         "src_modules": [type(m).__name__ for m in model.decoder.layers[0].modules()],
         "std": pruned.config.init_method_std, "layers": pruned.config.num_layers,
         "untouched": weights_fingerprint(model) == before,
         "local": sum(p.numel() for p in pruned.parameters()),
         "ref_local": sum(p.numel() for p in ref.parameters())}
    got, want = forward_logits(pruned, _tokens(), 2), forward_logits(ref, _tokens(), 2)
    # Independent of the slicing rules: keeping every unit gives back the unpruned model.
    whole = nm.prune(model, nm.make_plan(cfg, nm.Scores.load(scores),
                                         nm.Target(hardware_multiple=16), tp, pp))
    r["whole"], r["source"] = (forward_logits(m, _tokens(), 2) for m in (whole, model))
    # Layers 0 and 1 kept: under PP=2 the pruned layer 1 moves from stage 0 to stage 1.
    moved = nm.prune(model, nm.make_plan(cfg, nm.Scores.load(scores), nm.Target(
        drop_layers=[2, 3], hidden_size=48, hardware_multiple=16), tp, pp))
    r["moved"] = forward_logits(moved, _tokens(), 2)
    if tp == pp == 1:  # a subclass whose constructor takes more than GPTModel's arguments
        class Tagged(GPTModel):
            def __init__(self, tag: str, **kw) -> None:
                super().__init__(**kw)
                self.tag = tag

        tagged, _ = stock_model(teacher, Tagged, tag="mine")
        try:
            nm.prune(tagged, plan)
        except nm.ConfigError as e:
            r["refused"] = str(e)
        args = {k: getattr(pruned, k) for k in ("vocab_size", "max_sequence_length",
                                                "position_embedding_type")}
        built = nm.prune(tagged, plan, build=lambda c: Tagged(
            "built", config=c, transformer_layer_spec=tagged.transformer_layer_spec, **args))
        r["built"] = (type(built).__name__, built.tag)
        r["built_logits"] = forward_logits(built, _tokens(), 2)
        # GPTModel arguments it does not keep as attributes (read from its modules, or the
        # rotary frequencies copied): keeping every unit gives the same logits.
        roped, _ = stock_model(teacher, rotary_percent=0.5, rope_scaling=True,
                               rope_scaling_factor=4.0, seq_len_interpolation_factor=2.0)
        whole = nm.prune(roped, nm.make_plan(cfg, nm.Scores.load(scores),
                                             nm.Target(hardware_multiple=16)))
        r["rope"] = [forward_logits(m, _tokens(), 2) for m in (whole, roped)]
        names = ("rotary_percent", "rotary_scaling", "rotary_base", "vocab_size",
                 "max_sequence_length", "position_embedding_type", "parallel_output",
                 "share_embeddings_and_output_weights", "pre_process", "post_process")
        r["attrs"] = [[getattr(m, k) for k in names]
                      + [m.rotary_pos_emb.seq_len_interpolation_factor] for m in (whole, roped)]
    if got is not None and int(os.environ["RANK"]) == torch.distributed.get_world_size() - 1:
        torch.save({**r, "logits": got, "ref": want}, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher, tiny_overrides) -> Path:
    d = tmp_path_factory.mktemp("user-prune")
    scores = str(d / "scores.pt")
    spawn(scores_job, 1, scores, teacher)
    target = [f"target.{k}={v}" for k, v in TARGET.items()]
    res = run_cli("prune", teacher, str(d / "cli"), f"scores={scores}", *target,
                  "calib.num_samples=8", "calib.micro_batch_size=4", "calib.eval_samples=4",
                  *[o for o in tiny_overrides if o.startswith("data.")])
    assert res.returncode == 0, res.stderr
    for world in (1, 2):
        spawn(in_order, world, [(user_job, (str(d / f"{tp}x{pp}.pt"), teacher, scores,
                                            str(d / "cli"), tp, pp))
                                for tp, pp in LAYOUTS if tp * pp == world])
    return d


@pytest.mark.dist
@pytest.mark.parametrize("tp, pp", LAYOUTS, ids=["tp1", "tp2", "pp2"])
def test_library_prune_of_a_users_model_equals_the_cli(runs, tp, pp):
    r = torch.load(runs / f"{tp}x{pp}.pt", weights_only=False)
    assert r["logits"].shape == (4, 24, r["logits"].shape[-1])
    torch.testing.assert_close(r["logits"], r["ref"], atol=1e-6, rtol=0)
    assert r["is_gpt"], r["class"]  # the user's class, not nemo_minitron's subclass
    assert r["modules"] == r["src_modules"]  # built from the user's spec
    assert "ColumnParallelLinear" in r["modules"] and "DotProductAttention" in r["modules"]
    assert r["std"] == STD and r["layers"] == 2
    assert r["untouched"]
    torch.testing.assert_close(r["whole"], r["source"], atol=1e-6, rtol=0)
    assert (r["logits"] - r["source"]).abs().max() > 1e-2  # pruning did change the model
    assert r["local"] == r["ref_local"]
    # The same plan under every layout (TP=1 is the reference; reduction order differs).
    torch.testing.assert_close(r["moved"], torch.load(runs / "1x1.pt", weights_only=False)[
        "moved"], atol=1e-5, rtol=0)
    if tp == pp == 1:
        assert "Tagged" in r["refused"] and "build=" in r["refused"], r["refused"]
        assert r["built"] == ("Tagged", "built")
        torch.testing.assert_close(r["built_logits"], r["ref"], atol=1e-6, rtol=0)
        torch.testing.assert_close(r["rope"][0], r["rope"][1], atol=1e-6, rtol=0)
        assert (r["rope"][1] - r["source"]).abs().max() > 1e-4  # the rope arguments matter
        assert r["attrs"][0] == r["attrs"][1]
        assert r["attrs"][1][:3] == [0.5, True, 10000]

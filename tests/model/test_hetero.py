"""Heterogeneous models (a shape per layer) built by ``model.build`` on megatron-core's
``HeterogeneousTransformerConfig`` and heterogeneous layer spec: logits against a torch-only
recomputation of the same weights (``tests/helpers/hetero.py``), TP=2 and PP=2 against TP=1,
KV-cache decoding against the full forward, the full-state gather/fill, checkpoints resharded
across TP 2<->1 and PP 2<->1, parameter counts against the built models."""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist import in_order, spawn

BASE = dict(num_layers=4, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
            vocab_size=64, seq_length=16)


def shapes() -> list:
    """Different widths, fewer query groups, linear and no-op attention, no-op and linear MLP
    (every size even: TP=2 divides them)."""
    from nemo_minitron.config.hetero import LayerShape as S

    return [S(num_query_groups=2, ffn_hidden_size=40), S(attention="linear", mlp="no_op"),
            S(attention="no_op", ffn_hidden_size=24), S(mlp="linear")]


def _tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def _counts_job() -> None:
    # count_params equals the built model's parameter count for several heterogeneous shapes.
    from nemo_minitron.config import ModelConfig
    from nemo_minitron.config.hetero import LayerShape as S
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.params import count_params

    for extra in ({"layer_shapes": shapes()},
                  {"layer_shapes": shapes(), "add_bias_linear": True,
                   "normalization": "LayerNorm", "activation": "gelu"},
                  {"layer_shapes": [S(num_query_groups=1), S(attention="linear", mlp="linear"),
                                    S(ffn_hidden_size=8), S(attention="no_op", mlp="no_op")],
                   "num_query_groups": 2, "share_embeddings_and_output_weights": True}):
        cfg = ModelConfig(**BASE | extra)
        built = sum(p.numel() for p in build_model(cfg).parameters())
        assert count_params(cfg) == built, (extra, count_params(cfg), built)


def layout_job(out: str, tp: int, pp: int, ckpt_in: str | None, ckpt_out: str | None,
               full_in: str | None) -> None:
    from nemo_minitron.checkpoint.io import load_weights, save_checkpoint
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.model.build import build_model, unwrap
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.model.full_state import gather_full_state_dict, load_full_state_dict
    from nemo_minitron.parallel.runtime import init_distributed
    from tests.helpers.hetero import hetero_logits

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp,
                                    pipeline_model_parallel_size=pp), seed=8 if full_in else 7)
    cfg = ModelConfig(**BASE, layer_shapes=shapes())
    model = build_model(cfg)
    if ckpt_in:
        load_weights(ckpt_in, model)
    if full_in:
        load_full_state_dict(model, torch.load(full_in), cfg)
    logits = forward_logits(model, _tokens(), micro_batch_size=2)
    full = gather_full_state_dict(model)
    if tp == pp == 1 and not (ckpt_in or full_in):
        # The torch recomputation reads the test's own shapes; the model's config maps back.
        want = hetero_logits(full, _tokens(), shapes(), heads=4)
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
        back = ModelConfig.from_transformer_config(unwrap(model).config, vocab_size=64,
                                                   seq_length=16)
        assert back.layer_shapes == [cfg.layer_shape(i) for i in range(4)]
        torch.save(full, out + ".full")
        _counts_job()
        # Decoding against the KV cache (no cache in the linear / no-op attention layers, the
        # cached fast path) gives the full forward's logits at every position.
        from nemo_minitron.eval.decode import KVCache, decode_steps

        model.eval()
        with torch.no_grad():
            for pos, step in decode_steps(KVCache(model, 2, 16), _tokens(), 8, 16):
                torch.testing.assert_close(step, logits[:, pos - 1], atol=1e-5, rtol=0)
    if ckpt_out:
        save_checkpoint(ckpt_out, model, model_cfg=cfg, tokenizer=None)
    if logits is not None and int(os.environ["RANK"]) == torch.distributed.get_world_size() - 1:
        torch.save(logits, out)


@pytest.mark.dist
def test_hetero_logits_layouts_and_checkpoint_reshard(tmp_path):
    def p(name: str) -> str:
        return str(tmp_path / name)

    spawn(in_order, 1, [(layout_job, (p("tp1.pt"), 1, 1, None, p("ck_tp1"), None))])
    spawn(in_order, 2, [
        (layout_job, (p("tp2.pt"), 2, 1, None, p("ck_tp2"), None)),
        (layout_job, (p("pp2.pt"), 1, 2, None, p("ck_pp2"), None)),
        (layout_job, (p("pp2_full.pt"), 1, 2, None, None, p("tp1.pt.full"))),
        (layout_job, (p("tp2_full.pt"), 2, 1, None, None, p("tp1.pt.full"))),
        (layout_job, (p("tp2_from_tp1.pt"), 2, 1, p("ck_tp1"), None, None)),
        (layout_job, (p("pp2_from_tp1.pt"), 1, 2, p("ck_tp1"), None, None)),
        # TP=1 x DP=2: checkpoints saved under TP=2 and PP=2 load under TP=1.
        (layout_job, (p("from_tp2.pt"), 1, 1, p("ck_tp2"), None, None)),
        (layout_job, (p("from_pp2.pt"), 1, 1, p("ck_pp2"), None, None))])
    ref = torch.load(p("tp1.pt"))
    assert ref.shape == (2, 16, 64)
    # TP=2 draws the same weights as TP=1 (CPU initialisation); PP=2 draws its own, so it is
    # checked on TP=1's weights (full state dict, checkpoint) and its checkpoint under TP=1.
    for name, want in (("tp2", ref), ("pp2_full", ref), ("tp2_full", ref), ("tp2_from_tp1", ref),
                       ("pp2_from_tp1", ref), ("from_tp2", ref),
                       ("from_pp2", torch.load(p("pp2.pt")))):
        torch.testing.assert_close(torch.load(p(f"{name}.pt")), want, atol=1e-5, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_memory_estimate_counts_each_layer_its_own_size():
    # A heterogeneous model whose layers all have the model's shape is estimated as the uniform
    # one; making a layer no-op drops its parameters (6 + 12/DP bytes each) and activations.
    from nemo_minitron.config import ModelConfig
    from nemo_minitron.config.hetero import LayerShape as S
    from nemo_minitron.model.memory import GiB, memory_gib
    from nemo_minitron.model.params import count_params

    uniform = ModelConfig(**BASE)
    same = ModelConfig(**BASE, layer_shapes=[S() for _ in range(4)])
    assert memory_gib(same, 1, 1, 1, 2) == memory_gib(uniform, 1, 1, 1, 2)
    gone = ModelConfig(**BASE, layer_shapes=[S(attention="no_op", mlp="no_op"), S(), S(), S()])
    dropped = (6 + 12) * (count_params(uniform) - count_params(gone))
    acts = 2 * 16 * 2 * (4 * 32 + (4 + 8) * 8 + 4 * 8 + 3 * 48)  # 2sb(4h + qkv, proj, fc)
    assert (memory_gib(uniform, 1, 1, 1, 2) - memory_gib(gone, 1, 1, 1, 2)) * GiB == \
        pytest.approx(dropped + acts)


def test_a_users_heterogeneous_transformer_config_gives_its_layer_shapes():
    # The published block-config spelling (n_heads_in_group, ffn_mult), parsed by megatron-core.
    import json

    import torch.nn.functional as F
    from megatron.core.transformer.heterogeneous.heterogeneous_config import (
        HeterogeneousTransformerConfig,
    )

    from nemo_minitron.config import ModelConfig
    from nemo_minitron.config.hetero import LayerShape as S

    blocks = [{"attention": {"n_heads_in_group": 4, "no_op": False, "replace_with_linear": False},
               "ffn": {"ffn_mult": 2.0, "no_op": False, "replace_with_linear": False}},
              {"attention": {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False},
               "ffn": {"ffn_mult": None, "no_op": False, "replace_with_linear": True}}]
    tc = HeterogeneousTransformerConfig(
        num_layers=2, hidden_size=384, num_attention_heads=8, gated_linear_unit=True,
        activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
        heterogeneous_layers_config_encoded_json=json.dumps({"block_configs": blocks}))
    cfg = ModelConfig.from_transformer_config(tc, vocab_size=64, seq_length=16)
    assert cfg.layer_shapes == [S(num_query_groups=2, ffn_hidden_size=512),
                                S(attention="no_op", mlp="linear")]

"""``model.build``: each ``ModelConfig.activation`` builds Megatron's MLP with that activation,
checked against a torch-only recomputation of the MLP on the same weights."""

from __future__ import annotations

import pytest
import torch

from tests.dist import spawn

ACTS = {"swiglu": lambda h: torch.nn.functional.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1],
        "gelu": torch.nn.functional.gelu,
        "squared_relu": lambda h: torch.relu(h) ** 2}


def mlp_job(activation: str) -> None:
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.model.build import build_model, unwrap
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(), seed=3)
    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                      vocab_size=64, seq_length=16, activation=activation)
    mlp = unwrap(build_model(cfg)).decoder.layers[0].mlp
    x = torch.randn(5, 2, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, _ = mlp(x)
        want = ACTS[activation](x @ mlp.linear_fc1.weight.T) @ mlp.linear_fc2.weight.T
    assert mlp.linear_fc1.weight.shape[0] == 48 * (2 if activation == "swiglu" else 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", sorted(ACTS))
def test_mlp_activation_matches_a_torch_recomputation(activation):
    spawn(mlp_job, 1, activation)


MAPPED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
          "num_query_groups", "kv_channels", "normalization", "layernorm_epsilon",
          "gated_linear_unit", "activation_func", "add_bias_linear", "add_qkv_bias",
          "init_method_std")


def transformer_config_job(out: str) -> None:
    """A user's own TransformerConfig and stock GPTModel (megatron-core's local spec) meet our
    ModelConfig: the model we build from it computes the same logits on the same weights."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from nemo_minitron import ModelConfig
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(), seed=5)
    tc = TransformerConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96,
                           num_attention_heads=4, num_query_groups=2, normalization="RMSNorm",
                           layernorm_epsilon=1e-6, gated_linear_unit=True,
                           activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True,
                           hidden_dropout=0.0, attention_dropout=0.0,
                           use_cpu_initialization=True, bias_activation_fusion=False,
                           masked_softmax_fusion=False, apply_rope_fusion=False,
                           persist_layer_norm=False, gradient_accumulation_fusion=False)
    gpt = dict(vocab_size=128, position_embedding_type="rope", rotary_base=500000)
    stock = GPTModel(config=tc, transformer_layer_spec=get_gpt_layer_local_spec(
        normalization="RMSNorm"), max_sequence_length=32, **gpt)
    cfg = ModelConfig.from_transformer_config(tc, seq_length=32, **gpt)
    ours = build_model(cfg, attention="local")
    ours.load_state_dict(stock.state_dict())
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32).unsqueeze(0).expand(2, 32)
    stock.eval()
    ours.eval()
    with torch.no_grad():
        logits = [stock(tokens, pos, None), ours(tokens, pos, None)]
    back = cfg.to_transformer_config()
    torch.save({"logits": logits, "cfg": cfg,
                "again": ModelConfig.from_transformer_config(back, seq_length=32, **gpt),
                "fields": {k: (getattr(tc, k), getattr(back, k)) for k in MAPPED}}, out)


def test_a_users_transformer_config_round_trips(tmp_path):
    spawn(transformer_config_job, 1, str(tmp_path / "r.pt"))
    r = torch.load(tmp_path / "r.pt", weights_only=False)
    stock, ours = r["logits"]
    assert stock.shape == (2, 32, 128)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    cfg = r["cfg"]
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.activation, cfg.rotary_base,
            cfg.add_qkv_bias, cfg.layernorm_epsilon) == (2, 16, "swiglu", 500000, True, 1e-6)
    assert r["again"] == cfg
    for k, (want, got) in r["fields"].items():
        assert got == want, k

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

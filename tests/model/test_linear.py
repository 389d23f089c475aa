"""``model.linear``'s layers against megatron-core's own ``ColumnParallelLinear`` /
``RowParallelLinear`` on the same weights: bit-identical outputs (and returned biases) without
autograd, where one rank takes the direct product and two ranks Megatron's path, and identical
outputs and gradients under autograd (Megatron's path)."""

from __future__ import annotations

import pytest
import torch

from tests.dist import spawn


def _pair(cls, ours, cfg, size_in: int, size_out: int, **kw):
    """A stock layer and ours with the same (TP-sharded) weights and a call counter on ours'
    Megatron product."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    extra = (dict(gather_output=False) if cls is ColumnParallelLinear
             else dict(input_is_parallel=True))
    args = dict(config=cfg, init_method=torch.nn.init.normal_, is_expert=False, **extra, **kw)
    stock, mine = cls(size_in, size_out, **args), ours(size_in, size_out, **args)
    mine.load_state_dict(stock.state_dict())
    calls = []
    impl = mine._forward_impl

    def counted(**k):
        calls.append(1)
        return impl(**k)

    mine._forward_impl = counted
    return stock, mine, calls


def linear_job(tp: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.model.build import transformer_config
    from nemo_minitron.model.linear import (
        InferenceColumnParallelLinear,
        InferenceRowParallelLinear,
    )
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp), seed=5)
    cfg = transformer_config(ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64,
                                         num_attention_heads=4, vocab_size=64))
    g = torch.Generator().manual_seed(ps.get_tensor_model_parallel_rank())
    for cls, ours, width_in in ((ColumnParallelLinear, InferenceColumnParallelLinear, 32),
                                (RowParallelLinear, InferenceRowParallelLinear, 48 // tp)):
        for bias, skip in ((False, False), (True, False), (True, True)):
            stock, mine, calls = _pair(cls, ours, cfg, 32 if cls is ColumnParallelLinear
                                       else 48, 48 if cls is ColumnParallelLinear else 32,
                                       bias=bias, skip_bias_add=skip)
            if bias:
                with torch.no_grad():  # Megatron initialises biases to zero
                    stock.bias.normal_(generator=g)
                    mine.bias.copy_(stock.bias)
            x = torch.randn(5, 3, width_in, generator=g)
            with torch.no_grad():
                (got, got_b), (want, want_b) = mine(x), stock(x)
            assert torch.equal(got, want), (cls.__name__, bias, skip)
            assert (got_b is None) == (want_b is None) and (
                got_b is None or torch.equal(got_b, want_b))
            # One rank: the direct product; two ranks: Megatron's product and communication.
            assert len(calls) == (0 if tp == 1 else 1), (cls.__name__, tp)
            xg = x.clone().requires_grad_(True)
            outs = []
            for layer in (mine, stock):
                layer.zero_grad(set_to_none=True)
                xg.grad = None
                out, _ = layer(xg)
                out.pow(2).sum().backward()
                outs.append((out.detach(), xg.grad.clone(), layer.weight.grad.clone()))
            for a, b in zip(*outs):
                assert torch.equal(a, b), (cls.__name__, "autograd")
            assert len(calls) == (1 if tp == 1 else 2)  # autograd: always Megatron's path


def test_equals_megatron_linear_tp1():
    spawn(linear_job, 1, 1)


@pytest.mark.dist
def test_equals_megatron_linear_tp2():
    spawn(linear_job, 2, 2)

"""The heterogeneous search's budgets (``search.hetero.make_budget``): parameters, or inference
memory (weights + KV cache) against an independent count; refusals name the key and the
smallest reachable budget."""

from __future__ import annotations

import pytest

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.config.hetero import LayerShape
from nemo_minitron.search.blocks import BlockLibrary, MemoryBudget, layer_library, sublayer_options
from nemo_minitron.search.enumerate import SearchConfig
from nemo_minitron.search.hetero import check_budget, make_budget

SRC = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                  num_query_groups=2, kv_channels=8, seq_length=16, vocab_size=100)
M = MemoryBudget(target_gib=1.0, batch_size=3, context=40, bytes_per_param=2, kv_bytes=1)


def test_memory_costs_weights_and_kv_cache() -> None:
    b = make_budget(SRC, SearchConfig(mode="heterogeneous", budget="memory", memory=M))
    h, d = 32, 8
    attn = lambda g: h + (4 + 2 * g) * d * h + h * 4 * d  # noqa: E731 (norm, qkv, proj)
    mlp = lambda f: h + 3 * f * h  # noqa: E731 (norm, SwiGLU fc1, fc2)
    kv = lambda g: 2 * g * d * 40 * 3 * 1  # noqa: E731 (keys + values, context x batch, 1 byte)
    assert b.fixed == (100 * h * 2 + h) * 2  # embedding, output layer, final norm; 2 bytes
    assert b.cost(SRC, LayerShape()) == (attn(2) + mlp(64)) * 2 + kv(2)
    assert b.cost(SRC, LayerShape(num_query_groups=1, ffn_hidden_size=32)) == \
        (attn(1) + mlp(32)) * 2 + kv(1)
    assert b.cost(SRC, LayerShape(attention="no_op", mlp="linear")) == (h + h * h) * 2
    assert b.limit == 1024**3


def _lib(b):
    options = sublayer_options(SRC, BlockLibrary(), 1)
    zeros = {sub: [[0.0] * len(o) for _ in range(2)] for sub, o in options.items()}
    return layer_library(SRC, options, zeros, b.cost)


@pytest.mark.parametrize("search,needles", [
    (SearchConfig(target_params=10), ["search.target_params=10", "smallest reachable is 6432 "
                                      "parameters"]),
    (SearchConfig(target_params=10**6), ["search.target_params=1000000", "is not below the "
                                         "source's"]),
    (SearchConfig(mode="heterogeneous", budget="memory", memory=MemoryBudget(target_gib=1e-6)),
     ["search.memory.target_gib=1e-06", "smallest reachable is 12864 bytes"]),
])
def test_unreachable_budgets(search, needles) -> None:
    b = make_budget(SRC, search)
    with pytest.raises(ConfigError) as e:
        check_budget(SRC, _lib(b), b)
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_memory_budget_needs_its_target() -> None:
    with pytest.raises(ConfigError, match="search.memory.target_gib"):
        make_budget(SRC, SearchConfig(mode="heterogeneous", budget="memory"))

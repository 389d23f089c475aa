"""``bench``'s FLOP model per layer: a heterogeneous layer counts its own matmuls, and only a
full attention block attends to the context."""

from __future__ import annotations

from nemo_minitron.config import ModelConfig
from nemo_minitron.config.hetero import LayerShape as S
from nemo_minitron.eval.bench import flops_per_token, layer_table

BASE = dict(num_layers=3, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
            num_query_groups=2, vocab_size=64, seq_length=16)


def test_hetero_flops_count_each_layers_matmuls_and_attention():
    ctx = 100.0
    uniform = ModelConfig(**BASE)
    same = ModelConfig(**BASE, layer_shapes=[S(), S(), S()])
    assert flops_per_token(same, ctx) == flops_per_token(uniform, ctx)
    h, d, a, g, f = 32, 8, 4, 2, 48
    attn = h + (a + 2 * g) * d * h + h * a * d  # norm, qkv, proj
    mlp = h + 3 * f * h  # norm, SwiGLU fc1 [gate; up] and fc2
    scores = 4 * ctx * a * d  # q.k and probs.v over the context
    hetero = ModelConfig(**BASE, layer_shapes=[
        S(attention="no_op", ffn_hidden_size=24), S(attention="linear", mlp="no_op"),
        S(num_query_groups=1, mlp="linear")])
    want = (2 * ((h + 3 * 24 * h) + (h + h * h) + (h + (a + 2) * d * h + h * a * d + h + h * h))
            + scores + 2 * 64 * h)
    assert flops_per_token(hetero, ctx) == want
    assert flops_per_token(uniform, ctx) == 3 * (2 * (attn + mlp) + scores) + 2 * 64 * h
    table = layer_table(hetero, ctx)
    assert "| 0 | no_op | full 24 |" in table and "| 2 | full 1 | linear |" in table

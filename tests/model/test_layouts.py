"""``model.layouts`` against megatron-core's own layers: under TP=2 the attention and MLP outputs
of real Megatron layers equal plain-torch recomputations from the full tensors split with the
layout helpers; vocab ranges and layer numbers equal Megatron's own bookkeeping under TP=2/PP=2.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import spawn

CFG = dict(num_layers=4, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
           num_query_groups=2, kv_channels=8, seq_length=16, vocab_size=128,
           position_embedding_type="learned_absolute", add_qkv_bias=True)


def _gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim)


def _shards(t: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return parts


def tp_job() -> None:
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.utils import VocabUtility

    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.model import layouts as L
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=2), seed=3)
    cfg = ModelConfig(**CFG)
    model = build_model(cfg)
    rank, tp = ps.get_tensor_model_parallel_rank(), 2
    s, b, h, d = 6, 2, cfg.hidden_size, cfg.head_dim
    x = torch.randn(s, b, h, generator=torch.Generator().manual_seed(0))
    layer = model.decoder.layers[1]
    attn, mlp = layer.self_attention, layer.mlp

    # QKV: megatron's per-rank shard holds whole query groups; the gathered tensor is the full one
    qkv_w = _gather(attn.linear_qkv.weight.detach(), 0)
    qkv_b = _gather(attn.linear_qkv.bias.detach(), 0)
    q_w, k_w, v_w = L.split_qkv(qkv_w, cfg)
    q_b, k_b, v_b = L.split_qkv(qkv_b, cfg)
    torch.testing.assert_close(L.join_qkv(q_w, k_w, v_w, cfg), qkv_w, rtol=0, atol=0)
    parts = L.split_fused("self_attention.linear_qkv.weight", qkv_w, cfg)
    torch.testing.assert_close(L.join_fused("self_attention.linear_qkv.weight", parts, cfg), qkv_w)

    # attention: capture the input of linear_proj (the heads' outputs) and the output
    seen: dict[str, torch.Tensor] = {}
    hook = attn.linear_proj.register_forward_hook(
        lambda m, a, o: seen.__setitem__("ctx", a[0].detach()))
    with torch.no_grad():
        out, bias = attn(x, attention_mask=None)
    hook.remove()
    ctx = _gather(seen["ctx"], -1)  # [s, b, heads * d], heads in global order
    q = (F.linear(x, q_w, q_b)).view(s, b, cfg.num_attention_heads, d)
    k = (F.linear(x, k_w, k_b)).view(s, b, cfg.query_groups, d)
    v = (F.linear(x, v_w, v_b)).view(s, b, cfg.query_groups, d)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    proj_w = _gather(attn.linear_proj.weight.detach(), 1)
    ref_out = torch.zeros(s, b, h)
    group_of = {h: g for g in range(cfg.query_groups) for h in L.group_heads(cfg, g).tolist()}
    assert sorted(group_of) == list(range(cfg.num_attention_heads))
    torch.testing.assert_close(L.heads_by_group(torch.arange(4.0), 2),
                               torch.stack([L.group_heads(cfg, g) for g in range(2)]).float())
    for head in range(cfg.num_attention_heads):
        g = group_of[head]
        scores = torch.einsum("sbd,tbd->bst", q[:, :, head], k[:, :, g]) / d ** 0.5
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        o = torch.einsum("bst,tbd->sbd", p, v[:, :, g])
        cols = L.proj_head_cols(cfg, [head])
        torch.testing.assert_close(ctx[..., cols], o, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(L.split_heads(ctx, d)[:, :, head], o, atol=1e-5, rtol=1e-4)
        ref_out += o @ proj_w[:, cols].T
        # the row helpers pick exactly these tensors out of the fused weight
        torch.testing.assert_close(qkv_w[L.qkv_head_rows(cfg, head)], q_w[head * d:(head + 1) * d])
    torch.testing.assert_close(out + (bias if bias is not None else 0), ref_out,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(L.proj_per_head(proj_w, cfg)[:, 3], proj_w[:, 3 * d:4 * d])
    for g in range(cfg.query_groups):
        kv = qkv_w[L.qkv_kv_rows(cfg, g)]
        torch.testing.assert_close(kv, torch.cat([k_w[g * d:(g + 1) * d], v_w[g * d:(g + 1) * d]]))
        heads = [g * 2, g * 2 + 1]
        torch.testing.assert_close(qkv_w[L.qkv_group_rows(cfg, g)],
                                   qkv_w[L.qkv_rows(cfg, [g], [heads])])
    # a pruned selection is itself in the layout: group 1 with head 3 only
    small = qkv_w[L.qkv_rows(cfg, [1], [[3]])]
    torch.testing.assert_close(small, torch.cat([q_w[3 * d:4 * d], k_w[d:], v_w[d:]]))

    # SwiGLU fc1: every rank holds [gate_r; up_r]
    shards = _shards(mlp.linear_fc1.weight.detach())
    fc1 = L.fc1_from_tp_shards(shards)
    torch.testing.assert_close(L.fc1_tp_shard(fc1, rank, tp), mlp.linear_fc1.weight.detach())
    gate, up = L.split_fc1(fc1)
    torch.testing.assert_close(L.join_fc1(gate, up), fc1)
    assert set(L.split_fused("mlp.linear_fc1.weight", fc1, cfg)) == {"gate", "up"}
    fc2 = _gather(mlp.linear_fc2.weight.detach(), 1)
    with torch.no_grad():
        y, _ = mlp(x)
    ref = (F.silu(x @ gate.T) * (x @ up.T)) @ fc2.T
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    n = torch.tensor([5, 40])
    torch.testing.assert_close(fc1[L.fc1_rows(cfg, n)], torch.cat([gate[n], up[n]]))

    # vocabulary: megatron's own range of this rank's embedding rows
    emb = model.embedding.word_embeddings
    per = emb.num_embeddings_per_partition
    assert L.vocab_range(per, rank) == (emb.vocab_start_index, emb.vocab_end_index)
    assert L.vocab_range(per, rank) == tuple(
        VocabUtility.vocab_range_from_per_partition_vocab_size(per, rank, tp))
    # the embedding's vocabulary: the tokenizer's, padded (ModelConfig owns the rule)
    assert [dataclasses.replace(cfg, make_vocab_size_divisible_by=128).padded_vocab_size(n)
            for n in (1000, 1024)] == [1024, 1024]


def pp_job() -> None:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.model import layouts as L
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(pipeline_model_parallel_size=2), seed=3)
    model = build_model(ModelConfig(**CFG))
    offset = get_transformer_layer_offset(model.config)
    assert offset == 2 * torch.distributed.get_rank()
    assert L.layer_offset(model) == offset
    assert list(L.global_layers(model)) == [offset, offset + 1]
    # state-dict keys are stage-local; layer_key/split_layer_key speak the same names
    keys = [k for k in model.state_dict() if k.endswith("linear_qkv.weight")]
    assert [L.split_layer_key(k) for k in keys] == [(0, "self_attention.linear_qkv.weight"),
                                                     (1, "self_attention.linear_qkv.weight")]
    assert L.layer_key(1, "mlp.linear_fc2.weight") == "decoder.layers.1.mlp.linear_fc2.weight"


@pytest.mark.dist
@pytest.mark.parametrize("job", [tp_job, pp_job], ids=["tp2", "pp2"])
def test_layouts_match_megatron(job):
    spawn(job, 2)


def test_split_join_fused_roundtrip_and_passthrough():
    from nemo_minitron.config import ModelConfig
    from nemo_minitron.model import layouts as L

    cfg = ModelConfig(**{**CFG, "activation": "gelu"})
    fc1 = torch.randn(48, 32)
    assert L.split_fused("mlp.linear_fc1.weight", fc1, cfg) == {"": fc1}  # not gated
    w = torch.randn(32, 32)
    assert L.join_fused("mlp.linear_fc2.weight", L.split_fused("mlp.linear_fc2.weight", w, cfg),
                        cfg) is w

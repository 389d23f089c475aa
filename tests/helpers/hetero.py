"""A torch-only recomputation of a heterogeneous Llama-style model's logits from its full
(TP=1) state dict, read by weight name: the independent reference of the heterogeneous model
tests. Each layer's shape (which blocks are full, linear or no-op; its query groups) is the
test's own ``LayerShape`` list, not the model's."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding of ``x [b, s, heads, d]`` (rotate-half, positions 0..s-1)."""
    s, d = x.shape[1], x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    emb = torch.cat([angles, angles], -1)[None, :, None, :]
    x1, x2 = x.double().chunk(2, -1)
    out = x.double() * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()
    return out.to(x.dtype)


def attention(x: torch.Tensor, qkv: torch.Tensor, proj: torch.Tensor, heads: int, groups: int,
              base: float) -> torch.Tensor:
    """Causal GQA self-attention of ``x [b, s, h]``: ``qkv`` rows per query group
    ``[q heads of the group; k; v]`` (Megatron's layout), ``groups`` the layer's own count."""
    b, s, _ = x.shape
    per = heads // groups
    d = qkv.shape[0] // (groups * (per + 2))
    y = (x @ qkv.T).view(b, s, groups, per + 2, d)
    q = rope(y[:, :, :, :per].reshape(b, s, heads, d), base)
    k = rope(y[:, :, :, per], base).repeat_interleave(per, 2)
    v = y[:, :, :, per + 1].repeat_interleave(per, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, heads * d) @ proj.T


def swiglu_mlp(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    """``fc2(silu(gate) * up)`` with ``fc1 = [gate; up]``."""
    gate, up = (x @ fc1.T).chunk(2, -1)
    return (F.silu(gate) * up) @ fc2.T


def hetero_logits(full: dict[str, torch.Tensor], tokens: torch.Tensor, shapes: list,
                  heads: int, eps: float = 1e-5, base: float = 10000.0) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` of ``tokens`` under the weights ``full`` (Megatron's TP=1 names)
    of an RMSNorm / RoPE / SwiGLU model whose layer i has shape ``shapes[i]``
    (``attention`` / ``mlp``: full | linear | no_op; ``num_query_groups``, None: one per
    head)."""
    x = full["embedding.word_embeddings.weight"][tokens]
    for i, shape in enumerate(shapes):
        p = f"decoder.layers.{i}."
        if shape.attention == "full":
            n = rms_norm(x, full[p + "input_layernorm.weight"], eps)
            x = x + attention(n, full[p + "self_attention.linear_qkv.weight"],
                              full[p + "self_attention.linear_proj.weight"], heads,
                              shape.num_query_groups or heads, base)
        elif shape.attention == "linear":
            n = rms_norm(x, full[p + "input_layernorm.weight"], eps)
            x = x + n @ full[p + "self_attention.weight"].T
        if shape.mlp == "full":
            n = rms_norm(x, full[p + "pre_mlp_layernorm.weight"], eps)
            x = x + swiglu_mlp(n, full[p + "mlp.linear_fc1.weight"],
                               full[p + "mlp.linear_fc2.weight"])
        elif shape.mlp == "linear":
            n = rms_norm(x, full[p + "pre_mlp_layernorm.weight"], eps)
            x = x + n @ full[p + "mlp.weight"].T
    x = rms_norm(x, full["decoder.final_layernorm.weight"], eps)
    return x @ full["output_layer.weight"].T

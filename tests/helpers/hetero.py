"""A torch-only recomputation of a heterogeneous Llama-style model's logits from its weights,
read by name (Megatron's full TP=1 state dict, or a Hugging Face DeciLM checkpoint): the
independent reference of the heterogeneous model and export tests. Each layer's shape (which
blocks are full, linear or no-op; its query groups) is the test's own ``LayerShape`` list, not
the model's."""

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


def attention(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
              wo: torch.Tensor, heads: int, base: float) -> torch.Tensor:
    """Causal GQA self-attention of ``x [b, s, h]`` with separate q/k/v/o weights (Llama's
    names); the group count is ``wk``'s rows over the head dimension."""
    b, s, _ = x.shape
    d = wq.shape[0] // heads
    groups = wk.shape[0] // d
    per = heads // groups
    q = rope((x @ wq.T).view(b, s, heads, d), base)
    k = rope((x @ wk.T).view(b, s, groups, d), base).repeat_interleave(per, 2)
    v = (x @ wv.T).view(b, s, groups, d).repeat_interleave(per, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, heads * d) @ wo.T


def split_megatron_qkv(qkv: torch.Tensor, heads: int, groups: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v weights of Megatron's ``linear_qkv``: rows per query group
    ``[q heads of the group; k; v]``."""
    per = heads // groups
    w = qkv.view(groups, per + 2, -1, qkv.shape[-1])
    d = w.shape[2]
    return (w[:, :per].reshape(heads * d, -1), w[:, per].reshape(groups * d, -1),
            w[:, per + 1].reshape(groups * d, -1))


def swiglu_mlp(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    """``fc2(silu(gate) * up)`` with ``fc1 = [gate; up]``."""
    gate, up = (x @ fc1.T).chunk(2, -1)
    return (F.silu(gate) * up) @ fc2.T


MEGATRON = {"attn_norm": "input_layernorm.weight", "mlp_norm": "pre_mlp_layernorm.weight",
            "attn_linear": "self_attention.weight", "mlp_linear": "mlp.weight",
            "embed": "embedding.word_embeddings.weight", "norm": "decoder.final_layernorm.weight",
            "head": "output_layer.weight", "layer": "decoder.layers.{}."}
"""Weight names of Megatron's full (TP=1) state dict."""
DECILM = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
          "attn_linear": "self_attn.linear_attn.weight", "mlp_linear": "mlp.linear_mlp.weight",
          "embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
          "head": "lm_head.weight", "layer": "model.layers.{}."}
"""Weight names of a Hugging Face DeciLM (block-config) checkpoint."""


def hetero_logits(full: dict[str, torch.Tensor], tokens: torch.Tensor, shapes: list,
                  heads: int, eps: float = 1e-5, base: float = 10000.0,
                  names: dict[str, str] = MEGATRON) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` of ``tokens`` under the weights ``full`` (``names``: Megatron's
    TP=1 names or ``DECILM``'s) of an RMSNorm / RoPE / SwiGLU model whose layer i has shape
    ``shapes[i]`` (``attention`` / ``mlp``: full | linear | no_op; ``num_query_groups``, None:
    one per head)."""
    n = names
    x = full[n["embed"]][tokens]
    for i, shape in enumerate(shapes):
        p = n["layer"].format(i)
        if shape.attention != "no_op":
            y = rms_norm(x, full[p + n["attn_norm"]], eps)
            if shape.attention == "linear":
                x = x + y @ full[p + n["attn_linear"]].T
            elif names is MEGATRON:
                qkv = split_megatron_qkv(full[p + "self_attention.linear_qkv.weight"], heads,
                                         shape.num_query_groups or heads)
                x = x + attention(y, *qkv, full[p + "self_attention.linear_proj.weight"],
                                  heads, base)
            else:
                x = x + attention(y, *(full[f"{p}self_attn.{w}_proj.weight"] for w in "qkvo"),
                                  heads, base)
        if shape.mlp != "no_op":
            y = rms_norm(x, full[p + n["mlp_norm"]], eps)
            if shape.mlp == "linear":
                x = x + y @ full[p + n["mlp_linear"]].T
            elif names is MEGATRON:
                x = x + swiglu_mlp(y, full[p + "mlp.linear_fc1.weight"],
                                   full[p + "mlp.linear_fc2.weight"])
            else:
                gate, up = full[p + "mlp.gate_proj.weight"], full[p + "mlp.up_proj.weight"]
                x = x + swiglu_mlp(y, torch.cat([gate, up]), full[p + "mlp.down_proj.weight"])
    x = rms_norm(x, full[n["norm"]], eps)
    return x @ full[n["head"]].T

"""A tiny model with planted inert units for the heterogeneous search tests: 2 layers, 4 query
groups of one head, 64 MLP neurons; inert units in different numbers per layer."""

from __future__ import annotations

import torch

FFN_DEAD = {0: 16, 1: 32}
"""Layer -> inert MLP neurons (of 64)."""
GROUPS_DEAD = {0: [1, 3], 1: []}
"""Layer -> inert query groups (of 4)."""


def plant(model: torch.nn.Module, cfg) -> None:
    """Inert neurons (fc1 rows and fc2 columns zero) and inert groups (value rows and the
    heads' linear_proj columns zero) in ``model``, built at TP=1 (full tensors)."""
    from nemo_minitron.model import layouts

    with torch.no_grad():
        for i, layer in enumerate(model.decoder.layers):
            dead = torch.arange(FFN_DEAD[i]) * (64 // max(1, FFN_DEAD[i]))
            layer.mlp.linear_fc1.weight[layouts.fc1_rows(cfg, dead)] = 0
            layer.mlp.linear_fc2.weight[:, dead] = 0
            for g in GROUPS_DEAD[i]:
                layer.self_attention.linear_qkv.weight[layouts.qkv_kv_rows(cfg, g)[8:]] = 0
                cols = layouts.proj_head_cols(cfg, layouts.group_heads(cfg, g).tolist())
                layer.self_attention.linear_proj.weight[:, cols] = 0

"""Baseline importance criteria to compare activation importance with (``prune importance=``).

- ``magnitude``: from the weights alone (no data). An MLP neuron scores
  ``|gate row| * |up row| * |fc2 column|`` (``|fc1 row| * |fc2 column|`` without gating); a head
  the L2 norm of its ``linear_proj`` columns; a query group the sum of its heads; an embedding
  channel the norm of its word-embedding column; a layer the norm of all its weights.
- ``random``: uniform noise from a seed (the floor any criterion must beat).

Both read the full TP=1 state dict (``model.full_state.gather_full_state_dict``), so they give the
same scores under every parallel layout.
"""

from __future__ import annotations

import torch

from nemo_minitron.config import ModelConfig
from nemo_minitron.importance.scores import Scores
from nemo_minitron.model import layouts


def magnitude_scores(full: dict[str, torch.Tensor], cfg: ModelConfig) -> Scores:
    """Weight-magnitude scores of the model whose full state dict is ``full``."""
    groups = cfg.query_groups
    ffn, heads, layers = [], [], torch.zeros(cfg.num_layers)
    for i in range(cfg.num_layers):
        fc1 = full[layouts.layer_key(i, "mlp.linear_fc1.weight")].double()
        fc2 = full[layouts.layer_key(i, "mlp.linear_fc2.weight")].double()
        if layouts.gated(cfg):
            gate, up = layouts.split_fc1(fc1)
            rows = gate.norm(dim=1) * up.norm(dim=1)
        else:
            rows = fc1.norm(dim=1)
        ffn.append(rows * fc2.norm(dim=0))
        proj = full[layouts.layer_key(i, "self_attention.linear_proj.weight")].double()
        heads.append(layouts.proj_per_head(proj, cfg).norm(dim=(0, 2)))
    for key, w in full.items():
        parsed = layouts.split_layer_key(key)
        if parsed is not None:
            layers[parsed[0]] += w.double().pow(2).sum().item()
    heads_t = torch.stack(heads).float()
    return Scores(ffn=torch.stack(ffn).float(), heads=heads_t,
                  groups=layouts.heads_by_group(heads_t, groups).sum(-1),
                  hidden=full["embedding.word_embeddings.weight"].double().norm(dim=0)
                  .float(), layers=layers.sqrt(), meta={"importance": "magnitude"})


def random_scores(cfg: ModelConfig, seed: int) -> Scores:
    """Uniform random scores of every unit, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    n, a = cfg.num_layers, cfg.num_attention_heads

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=g)

    heads = rand(n, a)
    return Scores(ffn=rand(n, cfg.ffn_hidden_size), heads=heads,
                  groups=layouts.heads_by_group(heads, cfg.query_groups).sum(-1),
                  hidden=rand(cfg.hidden_size), layers=rand(n),
                  meta={"importance": "random", "seed": seed})

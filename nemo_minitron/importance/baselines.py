"""Baseline importance criteria to compare activation importance with (``prune importance=``).

- ``magnitude``: from the weights alone (no data). An MLP neuron scores
  ``|gate row| * |up row| * |fc2 column|`` (``|fc1 row| * |fc2 column|`` without gating); a head
  the L2 norm of its ``linear_proj`` columns; a query group the sum of its heads; an embedding
  channel the norm of its word-embedding column; a layer the norm of all its weights. MoE: an
  expert the norm of its weights; an expert channel its neuron score summed over the layer's
  experts; a shared-expert channel as a dense neuron (no routing mass or load: no data).
- ``random``: uniform noise from a seed (the floor any criterion must beat).

Both read the full TP=1 state dict (``model.full_state.gather_full_state_dict``), so they give the
same scores under every parallel layout.
"""

from __future__ import annotations

import torch

from nemo_minitron.config import ModelConfig
from nemo_minitron.importance.scores import Scores
from nemo_minitron.model import layouts


def _neurons(full: dict[str, torch.Tensor], cfg: ModelConfig, layer: int,
             mlp: str) -> torch.Tensor:
    """Magnitude of each neuron of the MLP ``mlp`` (its layer-local prefix) of ``layer``."""
    fc1 = full[layouts.layer_key(layer, f"{mlp}.linear_fc1.weight")].double()
    fc2 = full[layouts.layer_key(layer, f"{mlp}.linear_fc2.weight")].double()
    if layouts.gated(cfg):
        gate, up = layouts.split_fc1(fc1)
        rows = gate.norm(dim=1) * up.norm(dim=1)
    else:
        rows = fc1.norm(dim=1)
    return rows * fc2.norm(dim=0)


def _moe_magnitudes(full: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    experts, channels, shared = [], [], []
    for i in range(cfg.num_layers):
        names = [f"{layouts.EXPERT_PREFIX}{e}" for e in range(cfg.num_moe_experts or 0)]
        experts.append(torch.stack([sum(
            full[layouts.layer_key(i, f"{n}.{w}.weight")].double().pow(2).sum()
            for w in ("linear_fc1", "linear_fc2")).sqrt() for n in names]))
        channels.append(torch.stack([_neurons(full, cfg, i, n) for n in names]))
        if cfg.moe_shared_expert_intermediate_size:
            shared.append(_neurons(full, cfg, i, "mlp.shared_experts"))
    per_expert = torch.stack(channels)
    out = {"experts": torch.stack(experts).float(), "expert_ffn": per_expert.sum(1).float(),
           "expert_channels": per_expert.float()}
    if shared:
        out["shared_expert_ffn"] = torch.stack(shared).float()
    return out


def magnitude_scores(full: dict[str, torch.Tensor], cfg: ModelConfig) -> Scores:
    """Weight-magnitude scores of the model whose full state dict is ``full``."""
    groups = cfg.query_groups
    ffn, heads, layers = [], [], torch.zeros(cfg.num_layers)
    for i in range(cfg.num_layers):
        ffn.append(torch.zeros(0) if cfg.is_moe else _neurons(full, cfg, i, "mlp"))
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
                  .float(), layers=layers.sqrt(), meta={"importance": "magnitude"},
                  **(_moe_magnitudes(full, cfg) if cfg.is_moe else {}))


def random_scores(cfg: ModelConfig, seed: int) -> Scores:
    """Uniform random scores of every unit, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    n, a = cfg.num_layers, cfg.num_attention_heads

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=g)

    heads = rand(n, a)
    moe = {}
    if cfg.is_moe:  # drawn after the dense axes: a dense model's draws are as before
        shared = cfg.moe_shared_expert_intermediate_size
        moe = {"experts": rand(n, cfg.num_moe_experts or 0),
               "expert_ffn": rand(n, cfg.expert_ffn_hidden_size),
               **({"shared_expert_ffn": rand(n, shared)} if shared else {})}
        moe["expert_channels"] = rand(n, cfg.num_moe_experts or 0, cfg.expert_ffn_hidden_size)
    return Scores(ffn=rand(n, 0 if cfg.is_moe else cfg.ffn_hidden_size),
                  heads=heads,
                  groups=layouts.heads_by_group(heads, cfg.query_groups).sum(-1),
                  hidden=rand(cfg.hidden_size), layers=rand(n),
                  meta={"importance": "random", "seed": seed}, **moe)

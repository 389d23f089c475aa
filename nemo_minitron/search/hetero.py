"""``search.mode: heterogeneous`` (Puzzle-style): one block per layer chosen under the
parameter budget from block scores on the parent (``search.blocks``) by the exact solver
(``search.solver``), then pruned to those per-layer shapes (``Target.layer_shapes``)."""

from __future__ import annotations

from typing import Any

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.config.hetero import LayerShape
from nemo_minitron.model.params import count_params, layer_params
from nemo_minitron.search.blocks import LayerLibrary
from nemo_minitron.search.solver import smallest_cost, solve


def choose_shapes(src: ModelConfig, lib: LayerLibrary, target_params: int) -> list[LayerShape]:
    """The per-layer shapes with the least summed score whose model has at most
    ``target_params`` parameters (embedding, output layer and final norm included)."""
    fixed = count_params(src) - src.num_layers * layer_params(src)
    low = fixed + smallest_cost(lib.costs)
    if target_params < low:
        raise ConfigError(f"search.target_params={target_params}: no combination of blocks "
                          f"meets it; the smallest reachable is {low} parameters (every "
                          f"layer's smallest block of search.blocks)")
    choice = solve(lib.costs, lib.scores, target_params - fixed)
    return [lib.shapes[i][c] for i, c in enumerate(choice)]


def shape_rows(src: ModelConfig, shapes: list[LayerShape]) -> list[dict[str, Any]]:
    """One row per layer for the report: attention (query groups or linear / no-op) and MLP
    (width or linear / no-op), and the layer's parameters."""
    cfg = ModelConfig(**{**src.__dict__, "layer_shapes": shapes})
    rows = []
    for i in range(src.num_layers):
        s = cfg.layer_shape(i)
        rows.append({"layer": i, "attention": s.attention, "num_query_groups": s.num_query_groups,
                     "mlp": s.mlp, "ffn_hidden_size": s.ffn_hidden_size,
                     "params": layer_params(cfg, layer=i)})
    return rows

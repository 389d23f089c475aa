"""``prune``: importance estimation and structured pruning to one target."""

from __future__ import annotations

import argparse

from nemo_minitron.cli.common import recipe_args, split_overrides


def cmd_prune(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.prune.stage import PruneRecipe, prune

    recipe, overrides = split_overrides(args)
    prune(args.checkpoint, args.out, load_recipe(recipe, overrides, cls=PruneRecipe))
    return 0


def add_prune(sub: argparse._SubParsersAction) -> None:
    """The ``prune`` verb's arguments."""
    p = sub.add_parser("prune", help="importance estimation + structured pruning",
                       description="Score every unit of CHECKPOINT on calibration data (or "
                                   "reuse scores=FILE), prune to the target shape, write the "
                                   "pruned checkpoint to OUT with OUT/pruning/{scores.pt,"
                                   "report.md,*.png}. Keys: target.{num_layers,hidden_size,"
                                   "ffn_hidden_size,num_attention_heads,num_query_groups,"
                                   "drop_layers}, calib.{num_samples,micro_batch_size,"
                                   "batch_agg,seq_agg,eval_samples}, data.*, scores, "
                                   "rescale_norms. target.layer_metric: how num_layers picks "
                                   "the layers to drop, one of block_importance (default: the "
                                   "lowest Block Importance), lm_loss (the contiguous block "
                                   "whose removal raises the validation LM loss least), "
                                   "angular_distance (the contiguous block whose input and "
                                   "output hidden states are closest). Per layer: "
                                   "target.layer_shapes=[{num_query_groups: G, "
                                   "ffn_hidden_size: F} | {attention: linear|no_op} | "
                                   "{mlp: linear|no_op}, ...], one per layer "
                                   "(docs/puzzle.md).")
    p.add_argument("checkpoint", help="source checkpoint")
    p.add_argument("out", help="pruned checkpoint directory (must not exist)")
    recipe_args(p)
    p.set_defaults(func=cmd_prune)


VERBS = {"prune": add_prune}
"""This module's verbs: name -> the function adding its arguments (``cli.build_parser``)."""

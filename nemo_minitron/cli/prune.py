"""Pruning verbs: ``prune`` (one target) and ``search`` (candidate shapes under a budget)."""

from __future__ import annotations

import argparse
import json

from nemo_minitron.cli.common import recipe_args, show_defaults, split_overrides
from nemo_minitron.utils.rank import is_rank0


def cmd_prune(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.prune.stage import PruneRecipe, prune

    recipe, overrides = split_overrides(args)
    prune(args.checkpoint, args.out, load_recipe(recipe, overrides, cls=PruneRecipe))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.search.stage import SearchRecipe, search

    recipe, overrides = split_overrides(args)
    summary = search(args.checkpoint, args.out, load_recipe(recipe, overrides, cls=SearchRecipe))
    if is_rank0():
        print(json.dumps(summary))
    return 75 if summary.get("interrupted") else 0  # stopped by a signal: run it again


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's verbs."""
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
                                   "output hidden states are closest).")
    p.add_argument("checkpoint", help="source checkpoint")
    p.add_argument("out", help="pruned checkpoint directory (must not exist)")
    recipe_args(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("search", help="architecture search under a parameter budget",
                       description="Enumerate pruned shapes of CHECKPOINT within "
                                   "search.target_params * (1 +- search.tolerance), prune each "
                                   "from one shared importance pass, distill each for "
                                   "search.retrain_steps steps, rank by validation loss (or "
                                   "search.score_fn) and write OUT/search/{candidates.json,"
                                   "report.md,loss_curves.png} and OUT/winner. Re-running the "
                                   "same command skips finished candidates. Grid keys: "
                                   "search.{layers,hidden,ffn,groups}_step, search.max_{layers,"
                                   "hidden,ffn,heads}_prune, search.proportional_heads, "
                                   "search.max_candidates; also calib.*, kd.*, train.*, data.*, "
                                   "parallel.*.")
    p.add_argument("checkpoint", help="source checkpoint (also the distillation teacher)")
    p.add_argument("out", help="output directory (re-use it to resume)")
    recipe_args(p)
    p.set_defaults(func=cmd_search)
    show_defaults(sub)

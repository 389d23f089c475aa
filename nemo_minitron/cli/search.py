"""``search``: candidate shapes under a parameter budget, each pruned and retrained."""

from __future__ import annotations

import argparse
import json

from nemo_minitron.cli.common import recipe_args, split_overrides
from nemo_minitron.utils.rank import is_rank0


def cmd_search(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.search.stage import SearchRecipe, search

    recipe, overrides = split_overrides(args)
    summary = search(args.checkpoint, args.out, load_recipe(recipe, overrides, cls=SearchRecipe))
    if is_rank0():
        print(json.dumps(summary))
    return 75 if summary.get("interrupted") else 0  # stopped by a signal: run it again


def add_search(sub: argparse._SubParsersAction) -> None:
    """The ``search`` verb's arguments."""
    p = sub.add_parser("search", help="architecture search under a parameter budget",
                       description="Enumerate pruned shapes of CHECKPOINT within "
                                   "search.target_params * (1 +- search.tolerance), prune each "
                                   "from one shared importance pass, distill each for "
                                   "search.retrain_steps steps, rank by validation loss (or "
                                   "search.score_fn) and write OUT/search/{candidates.json,"
                                   "report.md,loss_curves.png} and OUT/winner. Re-running the "
                                   "same command skips finished candidates. Grid keys: "
                                   "search.{num_layers,hidden_size,ffn_hidden_size,"
                                   "num_query_groups}_step, search.max_{num_layers,hidden_size,"
                                   "ffn_hidden_size,num_attention_heads}_prune, "
                                   "search.proportional_heads, "
                                   "search.max_candidates; also calib.*, kd.*, train.*, data.*, "
                                   "parallel.*. search.mode=heterogeneous chooses one block per "
                                   "layer from search.blocks.* under search.target_params by an "
                                   "exact solver instead (docs/puzzle.md).")
    p.add_argument("checkpoint", help="source checkpoint (also the distillation teacher)")
    p.add_argument("out", help="output directory (re-use it to resume)")
    recipe_args(p)
    p.set_defaults(func=cmd_search)


VERBS = {"search": add_search}
"""This module's verbs: name -> the function adding its arguments (``cli.build_parser``)."""

"""``merge``: SLERP, linear or task-arithmetic merge of checkpoints of one shape."""

from __future__ import annotations

import argparse
import json
import os

from nemo_minitron.cli.common import recipe_args, split_overrides


def cmd_merge(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.merge.config import MergeRecipe
    from nemo_minitron.merge.run import merge_checkpoints

    recipe, overrides = split_overrides(args)
    if args.method is not None:
        overrides.append(f"merge.method={args.method}")
    cfg = load_recipe(recipe, overrides, cls=MergeRecipe).merge
    summary = merge_checkpoints(args.base, args.other, args.out, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def add_merge(sub: argparse._SubParsersAction) -> None:
    """The ``merge`` verb's arguments."""
    p = sub.add_parser("merge", help="SLERP / linear / task-arithmetic merge of checkpoints",
                       description="Merge checkpoints of one architecture and tokenizer into "
                                   "OUT, streamed one tensor at a time (torchrun: the tensors "
                                   "are divided among the processes). Keys: merge.{method,t,"
                                   "weights,normalize,scale,combine,dot_threshold,eps,"
                                   "allow_extrapolation}; t and weights take a number, a "
                                   "list over layer depth or {filter, value} rules as in "
                                   "mergekit (see recipes/merge.yaml).")
    recipe_args(p)
    p.add_argument("--base", required=True,
                   help="slerp: t=0 end; linear: first input; task: the common base model")
    p.add_argument("--other", action="append", required=True,
                   help="another checkpoint (repeatable for linear and task)")
    p.add_argument("--method", choices=["slerp", "linear", "task"],
                   help="overrides merge.method")
    p.add_argument("--out", required=True, help="merged checkpoint directory (must not exist)")
    p.set_defaults(func=cmd_merge)


VERBS = {"merge": add_merge}
"""This module's verbs: name -> the function adding its arguments (``cli.build_parser``)."""

"""``demo``: the end-to-end run on the embedded default (the README's first command)."""

from __future__ import annotations

import argparse

from nemo_minitron.cli.common import RECIPES, recipe_args, split_overrides


def cmd_demo(args: argparse.Namespace) -> int:
    from nemo_minitron.demo import run_demo

    recipe, overrides = split_overrides(args)
    stage: dict[str, list[str]] = {"prune.": [], "distill.": [], "": []}
    for o in overrides:  # prune.KEY=V / distill.KEY=V: that stage's recipe; others: the teacher
        prefix = next(p for p in stage if o.startswith(p))
        stage[prefix].append(o[len(prefix):])
    run_demo(recipe, stage[""], args.out, prune_overrides=stage["prune."],
             distill_overrides=stage["distill."])
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    """The ``demo`` verb's arguments."""
    p = sub.add_parser("demo", help="end-to-end demo on the embedded corpus (stdlib source)",
                       description="Build the embedded corpus and tokenizer, pretrain the tiny "
                                   "teacher (RECIPE, default tiny_cpu.yaml), prune it to about "
                                   "half (tiny_cpu_prune.yaml), distill it into the pruned model "
                                   "(tiny_cpu_distill.yaml) and print the validation losses of "
                                   "the teacher, the one-shot pruned and the distilled model. "
                                   "Overrides apply to the teacher's recipe (data.* to every "
                                   "stage); prune.KEY=VALUE and distill.KEY=VALUE to that "
                                   "stage's. OUT/data links to the corpus (OUT/data/corpus: "
                                   "the --data PREFIX of eval, specdec...). Re-running resumes "
                                   "or reuses each stage.")
    recipe_args(p, default=str(RECIPES / "tiny_cpu.yaml"))
    p.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    p.set_defaults(func=cmd_demo)


VERBS = {"demo": add_demo}
"""This module's verbs: name -> the function adding its arguments (``cli.build_parser``)."""

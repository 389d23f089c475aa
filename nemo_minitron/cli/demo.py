"""End-to-end runs on the embedded default: ``demo`` (the README's first command) and
``bench-method`` (the method's findings in miniature)."""

from __future__ import annotations

import argparse

from nemo_minitron.cli.common import RECIPES, recipe_args, show_defaults, split_overrides


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


def cmd_bench_method(args: argparse.Namespace) -> int:
    from nemo_minitron.method_bench import load_bench_recipe, run_method_bench

    recipe, overrides = split_overrides(args)
    command = " ".join(["nemo-minitron", "bench-method", *([recipe] if recipe else []),
                        *overrides, "--out", args.out, "--report", args.report or
                        f"{args.out}/report"])
    print(run_method_bench(load_bench_recipe(recipe, overrides), args.out,
                           args.report or f"{args.out}/report", command))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's verbs."""
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

    p = sub.add_parser("bench-method", help="reproduce the method's findings in miniature",
                       description="Pretrain the demo teacher (or study.teacher=CKPT), then "
                                   "compare aggregations, importance criteria, width vs depth, "
                                   "KD vs cross-entropy, logit vs logit+intermediate losses, "
                                   "distilled vs from scratch, single-shot vs iterative "
                                   "importance and throughput, each through the library's own "
                                   "stages, and write a Markdown report with PNG plots. "
                                   "Defaults: recipes/method_bench.yaml (about an hour on 2 CPU "
                                   "cores). Re-running the same command reuses finished work.")
    recipe_args(p)
    p.add_argument("--out", default="runs/method_bench", help="work directory (re-use it to "
                   "resume)")
    p.add_argument("--report", default=None, help="report directory (default OUT/report)")
    p.set_defaults(func=cmd_bench_method)
    show_defaults(sub)

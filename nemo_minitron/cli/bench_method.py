"""``bench-method``: the method's findings in miniature (the study in ``benchmarks/method``
of a checkout)."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from types import ModuleType

from nemo_minitron.cli.common import recipe_args, split_overrides
from nemo_minitron.config import ConfigError

STUDY = "benchmarks.method"
"""The study's package, at the top of a source checkout (it is not part of the library)."""


def study() -> ModuleType:
    """The study's package from the checkout this package runs from, or a one-line error for
    an installed package without one."""
    from nemo_minitron.utils.paths import checkout_dir

    root = checkout_dir()
    if root is None or not root.joinpath(*STUDY.split("."), "__init__.py").is_file():
        raise ConfigError("bench-method runs the study in benchmarks/method/ of a source "
                          "checkout, and this nemo_minitron is installed without one (clone "
                          "the repository and run it there)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(STUDY)


def cmd_bench_method(args: argparse.Namespace) -> int:
    method = study()
    load_bench_recipe, run_method_bench = method.load_bench_recipe, method.run_method_bench
    recipe, overrides = split_overrides(args)
    # Quoted as a shell would need it: an override may hold spaces (study.report_note).
    command = shlex.join(["nemo-minitron", "bench-method", *([recipe] if recipe else []),
                        *overrides, "--out", args.out, "--report", args.report or
                        f"{args.out}/report"])
    print(run_method_bench(load_bench_recipe(recipe, overrides), args.out,
                           args.report or f"{args.out}/report", command))
    return 0


def add_bench_method(sub: argparse._SubParsersAction) -> None:
    """The ``bench-method`` verb's arguments."""
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


VERBS = {"bench-method": add_bench_method}
"""This module's verbs: name -> the function adding its arguments (``cli.build_parser``)."""

"""Cluster verbs: ``launch`` (SLURM jobs, or here) and ``validate`` (layout and memory)."""

from __future__ import annotations

import argparse
import json


def _cluster_flags(args: argparse.Namespace) -> dict:
    from nemo_minitron.launch.run import CLUSTER_FLAGS

    return {k: getattr(args, k, None) for k in CLUSTER_FLAGS}


def cmd_launch(args: argparse.Namespace) -> int:
    from nemo_minitron.launch.run import run_launch

    return run_launch(args.recipe, args.overrides, cluster=args.cluster,
                      out=args.out, flags=_cluster_flags(args), dry_run=args.dry_run)


def cmd_validate(args: argparse.Namespace) -> int:
    from nemo_minitron.launch.run import run_validate

    print(json.dumps(run_validate(args.recipe, args.overrides,
                                  flags=_cluster_flags(args),
                                  gpu_memory_gb=args.gpu_memory_gb)))
    return 0


def _launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a pipeline recipe (with stages:), or a plain pretraining "
                                  "recipe (a plain prune recipe: validate only)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides; for a pipeline: workdir=, vars.X=, inputs.X.path=, "
                        "cluster.K=, <stage>.<recipe key>=")
    g = p.add_argument_group("resources (override the recipe's cluster: section)")
    g.add_argument("--nodes", type=int)
    g.add_argument("--gpus-per-node", type=int, help="0: CPU processes with gloo")
    g.add_argument("--tasks-per-node", type=int, help="default: one per GPU")
    g.add_argument("--cpus-per-task", type=int)


def add_launch(sub: argparse._SubParsersAction) -> None:
    """The ``launch`` verb's arguments."""
    p = sub.add_parser("launch", help="run a recipe or pipeline as SLURM jobs (or here)",
                       description="Render one sbatch script per stage (srun, one task per "
                                   "GPU, USR1 -> checkpoint -> requeue) and submit the stages "
                                   "whose output checkpoint is missing, chained by afterok "
                                   "dependencies; --cluster local runs them here with torchrun.")
    _launch_args(p)
    p.add_argument("--cluster", choices=["slurm", "local"], default="slurm")
    p.add_argument("--out", help="output directory of a plain recipe (default: runs/<stem>)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="time limit, e.g. 04:00:00")
    p.add_argument("--container-image", help="pyxis/enroot image, e.g. nvcr.io#nvidia/nemo:TAG")
    p.add_argument("--container-mounts", help="SRC:DST[,SRC:DST...]")
    p.add_argument("--job-name")
    p.add_argument("--signal-seconds", type=int,
                   help="USR1 this long before the time limit (default 300)")
    p.add_argument("--dry-run", action="store_true", help="print the scripts, submit nothing")
    p.set_defaults(func=cmd_launch)


def add_validate(sub: argparse._SubParsersAction) -> None:
    """The ``validate`` verb's arguments."""
    p = sub.add_parser("validate", help="check a recipe's layout and memory for a job size",
                       description="Divisibility (TP | heads, groups, ffn, vocab; PP | layers; "
                                   "TP*PP | world; micro batch * DP | global batch) and an "
                                   "estimate of GPU memory per stage; no GPU needed. Prints "
                                   "one JSON record per stage.")
    _launch_args(p)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0,
                   help="memory per GPU (default: %(default)s)")
    p.set_defaults(func=cmd_validate)


VERBS = {"launch": add_launch, "validate": add_validate}
"""This module's verbs: name -> the function adding its arguments (``cli.build_parser``)."""

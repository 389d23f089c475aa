"""Distillation verbs: ``distill`` and ``teacher-cache`` (a teacher's logits stored once)."""

from __future__ import annotations

import argparse

from nemo_minitron.cli.common import log, recipe_args, split_overrides


def cmd_distill(args: argparse.Namespace) -> int:
    from nemo_minitron.checkpoint.io import check_checkpoint, load_model_config
    from nemo_minitron.config import load_recipe
    from nemo_minitron.distill.stage import DistillRecipe, distill
    from nemo_minitron.train.preflight import check_fits, check_run_dir
    from nemo_minitron.train.pretrain import completed

    check_run_dir(args.out)  # before anything is built
    recipe, overrides = split_overrides(args)
    r = load_recipe(recipe, overrides, cls=DistillRecipe)
    teacher = load_model_config(check_checkpoint(args.teacher, "--teacher"))
    check_fits(r, load_model_config(check_checkpoint(args.student, "--student")), [teacher])
    summary = completed(distill(r, args.teacher, args.student, args.out))
    log.info("final checkpoint: %s", summary["final"])
    return 0


def cmd_teacher_cache(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.distill.cache_build import build_teacher_cache
    from nemo_minitron.distill.stage import DistillRecipe

    recipe, overrides = split_overrides(args)
    meta = build_teacher_cache(args.teacher, load_recipe(recipe, overrides, cls=DistillRecipe),
                               args.out, args.top_k)
    log.info("teacher cache %s: %d samples, top-%d; distill with kd.teacher_cache=%s",
             args.out, meta["num_samples"], meta["top_k"], args.out)
    return 0


def add_distill(sub: argparse._SubParsersAction) -> None:
    """The ``distill`` verb's arguments."""
    p = sub.add_parser("distill", help="knowledge distillation of a teacher into a student",
                       description="Train --student to imitate --teacher (frozen) on recipe.data "
                                   "with the pretraining loop: logit KL (kd.divergence, "
                                   "kd.temperature, kd.top_k), optional ground-truth CE "
                                   "(kd.lm_loss_weight), intermediate hidden-state and "
                                   "embedding losses (kd.hidden_weight, kd.layer_map, "
                                   "kd.embedding_weight). Resumes from the latest checkpoint "
                                   "under --out.")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (frozen)")
    p.add_argument("--student", required=True, help="student checkpoint, e.g. a pruned model")
    recipe_args(p)
    p.add_argument("--out", default="runs/distill", help="output directory")
    p.set_defaults(func=cmd_distill)


def add_teacher_cache(sub: argparse._SubParsersAction) -> None:
    """The ``teacher-cache`` verb's arguments."""
    p = sub.add_parser("teacher-cache", help="store a teacher's top-k log-probabilities once",
                       description="Run --teacher once over the training samples the same "
                                   "distill recipe reads and store its top-k log-probabilities "
                                   "per token in OUT; `distill kd.teacher_cache=OUT` then trains "
                                   "without running the teacher (forward KL on the top-k plus a "
                                   "tail bucket; exact when k covers the vocabulary). Resumes an "
                                   "unfinished build.")
    p.add_argument("--teacher", required=True, help="teacher checkpoint")
    recipe_args(p)
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--top-k", type=int, default=64, help="tokens kept per position "
                   "(default: %(default)s)")
    p.set_defaults(func=cmd_teacher_cache)


VERBS = {"distill": add_distill, "teacher-cache": add_teacher_cache}
"""This module's verbs: name -> the function adding its arguments (``cli.build_parser``)."""

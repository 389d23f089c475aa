"""Training verbs: ``pretrain``, ``finetune`` (teacher correction) and ``sft``."""

from __future__ import annotations

import argparse

from nemo_minitron.cli.common import RECIPES, log, recipe_args, split_overrides


def cmd_pretrain(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.train.preflight import check_fits, check_run_dir
    from nemo_minitron.train.pretrain import completed, pretrain

    recipe, overrides = split_overrides(args)
    r = load_recipe(recipe, overrides)
    check_run_dir(args.out, r.model)  # before the data and the model are built
    check_fits(r, r.model)
    summary = completed(pretrain(r, args.out))
    log.info("final checkpoint: %s", summary["final"])
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from nemo_minitron.checkpoint.io import load_model_config
    from nemo_minitron.config import load_recipe
    from nemo_minitron.train.preflight import check_fits, check_run_dir
    from nemo_minitron.train.pretrain import completed, finetune

    check_run_dir(args.out)  # before anything is built
    recipe, overrides = split_overrides(args)
    r = load_recipe(recipe, overrides)
    check_fits(r, load_model_config(args.checkpoint))
    summary = completed(finetune(r, args.checkpoint, args.out))
    log.info("final checkpoint: %s", summary["final"])
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.train.preflight import check_run_dir
    from nemo_minitron.train.pretrain import completed
    from nemo_minitron.train.sft import SFTRecipe, sft

    check_run_dir(args.out)  # before anything is built
    recipe, overrides = split_overrides(args)
    summary = completed(sft(load_recipe(recipe, overrides, cls=SFTRecipe), args.checkpoint,
                            args.data, args.out))
    log.info("final checkpoint: %s", summary["final"])
    return 0


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    """The ``pretrain`` verb's arguments."""
    p = sub.add_parser("pretrain", help="pretrain a model from scratch (a teacher)",
                       description="Pretrain recipe.model on recipe.data; resumes from the "
                                   "latest checkpoint under --out.")
    recipe_args(p)
    p.add_argument("--out", default="runs/pretrain", help="output directory")
    p.set_defaults(func=cmd_pretrain)


def add_finetune(sub: argparse._SubParsersAction) -> None:
    """The ``finetune`` verb's arguments."""
    p = sub.add_parser("finetune", help="continue training a checkpoint with the LM loss",
                       description="Teacher correction: fine-tune a checkpoint on recipe.data.")
    p.add_argument("checkpoint", help="checkpoint directory to start from")
    recipe_args(p)
    p.add_argument("--out", default="runs/finetune", help="output directory")
    p.set_defaults(func=cmd_finetune)


def add_sft(sub: argparse._SubParsersAction) -> None:
    """The ``sft`` verb's arguments."""
    p = sub.add_parser("sft", help="supervised fine-tuning on instruction data",
                       description="Fine-tune a checkpoint on Alpaca or chat JSONL with the "
                                   "loss on response tokens only, through the training loop, on "
                                   "any TP/PP/DP layout (recipe sections as for finetune, plus "
                                   "sft.valid_data, sft.valid_fraction, sft.pack, "
                                   "sft.chat_template). Resumes from the latest checkpoint "
                                   "under --out.")
    p.add_argument("checkpoint", help="checkpoint directory to start from")
    p.add_argument("data", help="instruction JSONL (Alpaca or chat)")
    recipe_args(p, default=str(RECIPES / "sft.yaml"))
    p.add_argument("--out", default="runs/sft", help="output directory")
    p.set_defaults(func=cmd_sft)


VERBS = {"pretrain": add_pretrain, "finetune": add_finetune, "sft": add_sft}
"""This module's verbs: name -> the function adding its arguments (``cli.build_parser``)."""

"""Stage entry points built on the training loop: ``pretrain`` (from scratch) and
``finetune`` (from a checkpoint, plain LM loss)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nemo_minitron.checkpoint.io import step_dir
from nemo_minitron.config import ConfigError, ModelConfig, Recipe
from nemo_minitron.data.datasets import GPTSplits, build_gpt_datasets
from nemo_minitron.data.resolve import check_data, resolve_data
from nemo_minitron.data.tokenizer import Tokenizer
from nemo_minitron.model.build import build_model, training_sequence_parallel
from nemo_minitron.parallel.runtime import Runtime, init_distributed, use_gpu
from nemo_minitron.train.loop import Trainer
from nemo_minitron.train.objectives import LMObjective, Objective
from nemo_minitron.train.optim import build_optimizer, wrap_ddp
from nemo_minitron.utils.logging import get_logger

log = get_logger("train")


def resolve_model_config(cfg: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """Fill ``vocab_size`` from the tokenizer (padded) and check they agree."""
    if cfg.vocab_size is None:
        return dataclasses.replace(cfg, vocab_size=cfg.padded_vocab_size(tokenizer.vocab_size))
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size})")
    return cfg


def build_splits(recipe: Recipe, prefix: str, tokenizer: Tokenizer, seq_length: int) -> GPTSplits:
    """Train/valid datasets sized for the run."""
    t = recipe.train
    splits = build_gpt_datasets(
        prefix, tokenizer, seq_length=seq_length, split=recipe.data.split, seed=recipe.data.seed,
        num_samples=(t.train_iters * t.global_batch_size, t.eval_iters * t.global_batch_size, 0),
    )
    if splits.train is None:
        raise ConfigError(f"data.split={recipe.data.split!r} leaves no training split")
    if splits.valid is None and t.eval_interval:
        raise ConfigError(f"data.split={recipe.data.split!r} leaves no validation split; "
                          "give it one or set train.eval_interval=0")
    return splits


def bf16_enabled(recipe: Recipe) -> bool:
    """``train.bf16`` or, when unset, whether a GPU is used."""
    if recipe.train.bf16 is None:
        return use_gpu()
    if recipe.train.bf16 and not use_gpu():
        log.warning("train.bf16 on CPU is slow; fp32 is the CPU default")
    return recipe.train.bf16


def make_trainer(recipe: Recipe, rt: Runtime, model_cfg: ModelConfig, tokenizer: Tokenizer,
                 prefix: str | None, out_dir: str | Path, *, init_checkpoint: str | None = None,
                 model: torch.nn.Module | None = None,
                 objective: Callable[[torch.nn.Module], Objective] | None = None,
                 splits: GPTSplits | None = None) -> Trainer:
    """Build the model (or take the in-memory ``model``; optionally load ``init_checkpoint``),
    DDP, optimizer, data, trainer. ``objective(model)`` is called on the model before DDP wraps
    it (it may attach trainable modules) and returns the objective; default: the LM loss.
    ``splits`` (e.g. instruction data) replaces the GPT datasets built from ``prefix``."""
    from nemo_minitron.checkpoint.io import load_weights

    recipe.validate_parallel(rt.world_size)
    model_cfg = model_cfg.with_seq_length(recipe.train.seq_length)
    bf16 = bf16_enabled(recipe)
    if model is None:
        model = build_model(model_cfg, bf16=bf16,
                            sequence_parallel=training_sequence_parallel(model_cfg))
    if init_checkpoint is not None:
        load_weights(init_checkpoint, model)
    obj = objective(model) if objective is not None else LMObjective(rt.device)
    model = wrap_ddp(model, distributed_optimizer=rt.is_gpu and rt.dp > 1)
    optimizer, scheduler = build_optimizer([model], recipe.train, bf16=bf16,
                                           distributed_optimizer=rt.is_gpu and rt.dp > 1)
    if splits is None:
        if prefix is None:
            raise ValueError("make_trainer needs a dataset prefix or splits")
        splits = build_splits(recipe, prefix, tokenizer, model_cfg.seq_length)
    return Trainer(recipe=recipe, runtime=rt, model=model, model_cfg=model_cfg,
                   tokenizer=tokenizer, objective=obj,
                   optimizer=optimizer, scheduler=scheduler, train_ds=splits.train,
                   valid_ds=splits.valid, out_dir=out_dir)


def pretrain(recipe: Recipe, out_dir: str | Path) -> dict[str, Any]:
    """Pretrain ``recipe.model`` from scratch on ``recipe.data``; resumes if ``out_dir`` holds
    checkpoints. Returns the loop's summary (``final`` is the last checkpoint)."""
    check_data(recipe.data)  # before the runtime starts: a one-line refusal
    rt = init_distributed(recipe.parallel, seed=recipe.train.seed)
    prefix, tokenizer = resolve_data(recipe.data)
    model_cfg = resolve_model_config(recipe.model, tokenizer)
    recipe = dataclasses.replace(recipe, model=model_cfg)
    return run_trainer(make_trainer(recipe, rt, model_cfg, tokenizer, prefix, out_dir), out_dir)


def finetune(recipe: Recipe, checkpoint: str, out_dir: str | Path) -> dict[str, Any]:
    """Continue training a checkpoint with the LM loss (teacher correction)."""
    from nemo_minitron.checkpoint.io import load_checkpoint_tokenizer, load_model_config

    model_cfg = load_model_config(checkpoint)
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    check_data(recipe.data, tokenizer)
    rt = init_distributed(recipe.parallel, seed=recipe.train.seed)
    prefix, tokenizer = resolve_data(recipe.data, tokenizer)
    recipe = dataclasses.replace(recipe, model=model_cfg)
    trainer = make_trainer(recipe, rt, model_cfg, tokenizer, prefix, out_dir,
                           init_checkpoint=checkpoint)
    return run_trainer(trainer, out_dir)


class Stopped(Exception):
    """A stage of a multi-stage command (``demo``, ``bench-method``) stopped early, by a signal
    or ``train.exit_interval``, after saving its checkpoint: the stages after it must not run
    on that checkpoint. The same command resumes it (``cli.main`` exits with 75)."""


def completed(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` (from ``run_trainer``) of a run that reached its last step; ``Stopped``
    if it was interrupted."""
    if summary["interrupted"]:
        raise Stopped(f"step {summary['step']} reached (a signal or train.exit_interval); "
                      f"checkpoint {summary['final']} saved: re-run the same command to resume")
    return summary


def run_trainer(trainer: Trainer, out_dir: str | Path) -> dict[str, Any]:
    """Run a trainer from ``make_trainer`` to the end (or a stop signal); the summary names the
    last checkpoint as ``final``."""
    summary = trainer.run()
    summary["final"] = str(step_dir(out_dir, trainer.state.step))
    return summary

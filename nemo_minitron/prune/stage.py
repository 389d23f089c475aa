"""The ``prune`` stage: checkpoint -> importance (or saved scores) -> plan -> pruned checkpoint
with its scores and report."""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from nemo_minitron.config import ConfigError, StageRecipe
from nemo_minitron.data.datasets import sequences
from nemo_minitron.importance.aggregate import Agg
from nemo_minitron.prune.origin import PruneOrigin
from nemo_minitron.prune.plan import Target
from nemo_minitron.utils.logging import get_logger

log = get_logger("prune")


@dataclass(kw_only=True)
class CalibConfig:
    """The calibration forward passes."""

    num_samples: int = 64
    """Calibration sequences (from the training split of ``data``)."""
    micro_batch_size: int = 8
    """Sequences per forward pass."""
    batch_agg: Agg = "l2"
    """Aggregation over sequences: mean, l2 or var."""
    seq_agg: Agg = "mean"
    """Aggregation over tokens of a sequence: mean, l2 or var."""
    eval_samples: int = 64
    """Validation sequences for the one-shot loss of the source and the pruned model."""
    seq_length: int | None = None
    """Tokens per calibration/validation sequence; None: the checkpoint's model.seq_length."""

    def __post_init__(self) -> None:
        if self.seq_length is not None and (isinstance(self.seq_length, bool)
                                            or self.seq_length <= 0):
            raise ConfigError(f"calib.seq_length={self.seq_length!r} must be a positive integer")
        if not isinstance(self.micro_batch_size, int) or self.micro_batch_size < 1:
            raise ConfigError(f"calib.micro_batch_size={self.micro_batch_size!r} must be a "
                              "positive integer")
        if self.num_samples < 1 or self.num_samples % self.micro_batch_size:
            raise ConfigError(f"calib.num_samples={self.num_samples} must be a positive "
                              f"multiple of calib.micro_batch_size={self.micro_batch_size}")
        if self.eval_samples % self.micro_batch_size:
            raise ConfigError(f"calib.eval_samples={self.eval_samples} must be a multiple of "
                              f"calib.micro_batch_size={self.micro_batch_size}")


@dataclass(kw_only=True)
class PruneRecipe(StageRecipe):
    """Everything the prune verb reads (``data``: calibration/validation data, the
    checkpoint's tokenizer is used; ``parallel``: the layout of the importance pass)."""

    target: Target = field(default_factory=Target)
    """The pruned shape."""
    calib: CalibConfig = field(default_factory=CalibConfig)
    """Calibration."""
    scores: str | None = None
    """A saved scores file: skip the forward passes."""
    importance: Literal["activation", "magnitude", "random"] = "activation"
    """How units are scored: activations on the calibration set (the method), or the
    baselines it is compared with, weight magnitude and random (``importance.baselines``)."""
    importance_seed: int = 0
    """Seed of importance=random."""
    rescale_norms: bool = True
    """Compensate RMSNorm weights (and epsilon) for removed channels."""
    local_distill_steps: int = 0
    """With target.layer_shapes: train every cut MLP block for this many full-batch Adam steps
    to reproduce the source block's output on the calibration tokens (blockwise local
    distillation, ``prune.hetero.distill_mlp_blocks``); 0: the sliced weights as they are."""

    def __post_init__(self) -> None:
        if self.local_distill_steps < 0:
            raise ConfigError(f"local_distill_steps={self.local_distill_steps} must be >= 0")


def calib_sequences(dataset: Any, n: int, what: str) -> torch.Tensor:
    """The first ``n`` sequences of ``dataset``, or a one-line error naming ``calib.<what>``."""
    if dataset is None or len(dataset) < n:
        have = 0 if dataset is None else len(dataset)
        raise ConfigError(f"calib.{what}={n}: the data holds only {have} sequences")
    return sequences(dataset, n)


def prune(checkpoint: str, out: str, recipe: PruneRecipe) -> dict[str, Any]:
    """Prune ``checkpoint`` to ``recipe.target``; write the pruned checkpoint to ``out`` and
    ``out/pruning/{scores.pt,report.md,*.png}``. Returns the summary."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.checkpoint.io import (
        check_checkpoint,
        has_tokenizer,
        load_checkpoint_tokenizer,
        load_model,
        load_model_config,
        no_space_left,
        save_checkpoint,
    )
    from nemo_minitron.data.datasets import build_gpt_datasets
    from nemo_minitron.data.resolve import check_data, resolve_data
    from nemo_minitron.importance.estimator import check_scores_match, estimate_importance
    from nemo_minitron.importance.layers import block_angular_distance, block_loss_increase
    from nemo_minitron.importance.scores import Scores
    from nemo_minitron.model.forward import lm_loss
    from nemo_minitron.model.params import count_params
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.prune.apply import prune_model
    from nemo_minitron.prune.hetero import distill_mlp_blocks, fit_linear_blocks, linear_blocks
    from nemo_minitron.prune.plan import angular_block, check_scores, make_plan, validate_target
    from nemo_minitron.prune.report import write_report
    from nemo_minitron.prune.result import write as write_result

    check_checkpoint(checkpoint)
    if Path(out).exists():
        raise ConfigError(f"output {out!r} already exists")
    c = recipe.calib  # validated when built (CalibConfig.__post_init__)
    if recipe.target.layer_metric == "angular_distance" and recipe.importance != "activation":
        raise ConfigError(f"target.layer_metric=angular_distance needs importance=activation "
                          f"(hidden states), not importance={recipe.importance}")
    src = load_model_config(checkpoint)
    p = recipe.parallel
    validate_target(src, recipe.target, p.tensor_model_parallel_size,
                    p.pipeline_model_parallel_size, p.expert_model_parallel_size)
    given = Scores.load(recipe.scores) if recipe.scores else None  # refused before any work
    if given is not None:
        check_scores(src, given, recipe.target)
    # A checkpoint imported without a tokenizer calibrates on data.path read with
    # data.tokenizer and stays without one; otherwise its own tokenizer reads the data.
    own = has_tokenizer(checkpoint) or None in (recipe.data.path, recipe.data.tokenizer)
    tokenizer = load_checkpoint_tokenizer(checkpoint) if own else None
    check_data(recipe.data, tokenizer)  # before the runtime starts: a one-line refusal
    rt = init_distributed(recipe.parallel)
    prefix, data_tok = resolve_data(recipe.data, tokenizer)
    splits = build_gpt_datasets(prefix, data_tok, seq_length=c.seq_length or src.seq_length,
                                split=recipe.data.split, seed=recipe.data.seed,
                                num_samples=(c.num_samples, c.eval_samples, 0))
    calib_tokens = calib_sequences(splits.train, c.num_samples, "num_samples")
    eval_tokens = calib_sequences(splits.valid, c.eval_samples, "eval_samples")
    model, _, _ = load_model(checkpoint)
    if given is not None:
        scores = given
        check_scores_match(scores, model)
    elif recipe.importance != "activation":
        scores = _baseline_scores(model, src, recipe)
    else:
        dp, rank = rt.dp, ps.get_data_parallel_rank()
        mine = calib_tokens[:, :-1].chunk(dp)[rank]
        scores = estimate_importance(model, mine, micro_batch_size=c.micro_batch_size,
                                     batch_agg=c.batch_agg, seq_agg=c.seq_agg,
                                     meta={"source": str(checkpoint)})
    target = recipe.target
    block_losses = None
    if target.layer_metric == "lm_loss" and target.num_layers is not None \
            and target.drop_layers is None and target.num_layers < src.num_layers:
        block = src.num_layers - target.num_layers
        block_losses = block_loss_increase(model, eval_tokens, c.micro_batch_size, block,
                                           src.num_layers)
        start = int(torch.argmin(block_losses))
        target = dataclasses.replace(target, drop_layers=list(range(start, start + block)))
        log.info("LM-loss increase per removed block of %d layers: %s; dropping %s", block,
                 [round(x, 4) for x in block_losses.tolist()], target.drop_layers)
    angular = None
    if target.layer_metric == "angular_distance" and target.num_layers is not None \
            and target.drop_layers is None and target.num_layers < src.num_layers:
        block = src.num_layers - target.num_layers
        start, _ = angular_block(scores, block)
        angular = block_angular_distance(scores.angular_distance, block)
        log.info("angular distance per removed block of %d layers: %s; dropping %s", block,
                 [round(x, 4) for x in angular.tolist()], list(range(start, start + block)))
    plan = make_plan(src, scores, target, rt.tp, rt.pp, rescale_norms=recipe.rescale_norms,
                     ep=p.expert_model_parallel_size)
    if plan.config.is_heterogeneous:  # every rank fits on all the tokens: the same weights
        plan.linear = fit_linear_blocks(model, calib_tokens[:, :-1], c.micro_batch_size,
                                        linear_blocks(plan.config), src.add_bias_linear)
        cut = {i: (i, kept) for i, kept in plan.kept_ffn.items()
               if len(kept) < src.ffn_hidden_size}
        if recipe.local_distill_steps and cut:
            plan.trained = distill_mlp_blocks(model, src, calib_tokens[:, :-1],
                                              c.micro_batch_size, cut,
                                              recipe.local_distill_steps)
    source_loss = lm_loss(model, eval_tokens, c.micro_batch_size)
    pruned = prune_model(model, plan)
    pruned_loss = lm_loss(pruned, eval_tokens, c.micro_batch_size)
    summary = {"source_params": count_params(src), "pruned_params": count_params(plan.config),
               "param_ratio": count_params(plan.config) / count_params(src),
               "source_valid_loss": source_loss, "pruned_valid_loss": pruned_loss,
               "kept_layers": plan.kept_layers, "calib_seq_length": c.seq_length or src.seq_length,
               "block_loss_increase": None if block_losses is None else block_losses.tolist(),
               "block_angular_distance": None if angular is None else angular.tolist(),
               "layers_removed_by": _layers_removed_by(recipe.target, src, plan.kept_layers),
               "local_distill_steps": recipe.local_distill_steps}
    importance = scores.meta.get("importance", "activation") if recipe.scores \
        else recipe.importance
    origin = PruneOrigin(kept_layers=plan.kept_layers, source=src, importance=importance)
    # The checkpoint and its pruning/ report appear together: both go into a staging
    # directory that is renamed to ``out`` last.
    staging = Path(out).with_name(f".{Path(out).name}.staging")
    if rt.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(staging, pruned, model_cfg=plan.config, tokenizer=tokenizer,
                    metadata=origin.to_metadata())
    if rt.rank == 0:
        try:
            write_report(write_result(staging, scores, summary), scores, plan, summary)
            os.rename(staging, out)
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, OSError) and no_space_left(e, staging.parent):
                raise ConfigError(f"no space left on the device holding {staging.parent} "
                                  f"(writing {out}; the partial copy was removed)") from None
            raise
    torch.distributed.barrier()
    log.info("pruned %d -> %d parameters (%.1f%%); validation loss %.4f -> %.4f (one-shot)",
             summary["source_params"], summary["pruned_params"], 100 * summary["param_ratio"],
             source_loss, pruned_loss)
    return summary


def _layers_removed_by(target: Target, src: Any, kept: list[int]) -> str | None:
    """What chose the removed layers: ``drop_layers``, a ``target.layer_metric``, or None."""
    if len(kept) == src.num_layers:
        return None
    return "drop_layers" if target.drop_layers is not None else target.layer_metric


def _baseline_scores(model: torch.nn.Module, src: Any, recipe: PruneRecipe) -> Any:
    from nemo_minitron.importance.baselines import magnitude_scores, random_scores
    from nemo_minitron.model.full_state import gather_full_state_dict
    from nemo_minitron.model.params import weights_fingerprint

    if recipe.importance == "magnitude":
        scores = magnitude_scores(gather_full_state_dict(model), src)
    else:
        scores = random_scores(src, recipe.importance_seed)
    scores.meta["fingerprint"] = weights_fingerprint(model)
    return scores


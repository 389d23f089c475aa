"""The ``distill`` stage: teacher checkpoint + student checkpoint -> trained student.

The training loop is the pretraining loop (``train.loop.Trainer``) with ``KDObjective``
plugged in; checkpoints hold the student (and its distillation projections) only, and a re-run
of the same command resumes exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemo_minitron.config import ConfigError, ModelConfig, Recipe, TrainConfig
from nemo_minitron.distill.cache_format import TeacherCache
from nemo_minitron.distill.instruct import (
    InstructKDConfig,
    Positioned,
    check_instruct,
    instruct_kd_splits,
    teacher_response_loss,
)
from nemo_minitron.distill.objective import KDConfig, KDObjective, add_projections
from nemo_minitron.distill.on_policy import OnPolicySampler
from nemo_minitron.distill.teacher_cache import check_teacher
from nemo_minitron.utils.logging import get_logger

log = get_logger("distill")

_cache_checked: set[tuple[Path, Path]] = set()
"""(teacher cache, teacher checkpoint) pairs whose weights fingerprints agreed."""


def _distill_train() -> TrainConfig:
    # The method's retraining schedule: 1e-4 -> 1e-5 cosine after 40 warm-up steps.
    return TrainConfig(lr=1e-4, min_lr=1e-5, lr_warmup_iters=40)


@dataclass(kw_only=True)
class DistillRecipe(Recipe):
    """A training recipe plus the distillation losses; ``model`` comes from the student."""

    train: TrainConfig = field(default_factory=_distill_train)
    """Training loop (defaults: lr 1e-4 -> 1e-5, 40 warm-up steps)."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Distillation losses."""
    instruct: InstructKDConfig = field(default_factory=InstructKDConfig)
    """Instruction data (``instruct.data``): response-only distillation on chat-formatted
    examples, as ``sft`` reads them; unset: the ``data`` section's pretraining-style data."""

    def __post_init__(self) -> None:
        check_instruct(self.instruct, self.kd.teacher_cache)
        if self.kd.on_policy.fraction > 0:
            self.kd.on_policy.check(instruct=self.instruct.enabled, pack=self.instruct.pack,
                                    pp=self.parallel.pipeline_model_parallel_size,
                                    teacher_cache=self.kd.teacher_cache is not None)


def layer_pairs(student_ckpt: str | None, student_layers: int, teacher_layers: int,
                layer_map: list[list[int]] | None) -> list[tuple[int, int]]:
    """``[(student_layer, teacher_layer)]``: the user's map, else the teacher layer each student
    layer was cut from (the student checkpoint's ``prune.origin``), else evenly spaced layers."""
    if layer_map is not None:
        for i, pair in enumerate(layer_map):
            if len(pair) != 2:
                raise ConfigError(f"kd.layer_map[{i}]={pair} must be [student_layer, "
                                  "teacher_layer]")
            s, t = pair
            if not 0 <= s < student_layers:
                raise ConfigError(f"kd.layer_map[{i}] names student layer {s}; the student "
                                  f"has layers 0..{student_layers - 1}")
            if not 0 <= t < teacher_layers:
                raise ConfigError(f"kd.layer_map[{i}] names teacher layer {t}; the teacher "
                                  f"has layers 0..{teacher_layers - 1}")
        return [(s, t) for s, t in layer_map]
    from nemo_minitron.prune.origin import prune_origin

    origin = prune_origin(student_ckpt) if student_ckpt else None
    if origin is not None and len(origin.kept_layers) == student_layers:
        return list(enumerate(origin.kept_layers))
    ls, lt = student_layers, teacher_layers
    return [(i, (i + 1) * lt // ls - 1) for i in range(ls)]


def _check_pair(teacher_ckpt: str, student_ckpt: str, t_cfg: ModelConfig,
                s_cfg: ModelConfig, tp: int, seq_length: int | None = None) -> int | None:
    """One-line errors for teacher/student that cannot be distilled together; returns the
    shared vocabulary when the padded vocabularies differ."""
    from nemo_minitron.checkpoint.io import load_checkpoint_tokenizer
    from nemo_minitron.data.tokenizer import same_tokenizer

    t_tok, s_tok = load_checkpoint_tokenizer(teacher_ckpt), load_checkpoint_tokenizer(student_ckpt)
    if not same_tokenizer(t_tok, s_tok):
        raise ConfigError(f"teacher {teacher_ckpt!r} and student {student_ckpt!r} use different "
                          f"tokenizers ({t_tok.vocab_size} vs {s_tok.vocab_size} tokens)")
    if seq_length is None and t_cfg.seq_length != s_cfg.seq_length:
        raise ConfigError(f"teacher model.seq_length={t_cfg.seq_length} differs from the "
                          f"student's {s_cfg.seq_length}; set train.seq_length")
    for who, cfg in (("teacher", t_cfg), ("student", s_cfg)):
        if (seq_length or s_cfg.seq_length) > cfg.context_length:
            raise ConfigError(f"train.seq_length={seq_length or s_cfg.seq_length} exceeds the "
                              f"{who}'s context length {cfg.context_length}")
    if t_cfg.vocab_size == s_cfg.vocab_size:
        return None
    if tp > 1:
        raise ConfigError(f"teacher and student padded vocabularies differ ({t_cfg.vocab_size} "
                          f"vs {s_cfg.vocab_size}); under tensor parallelism they must match")
    log.warning("teacher and student padded vocabularies differ (%d vs %d): distilling over "
                "the shared %d tokens", t_cfg.vocab_size, s_cfg.vocab_size, s_tok.vocab_size)
    return s_tok.vocab_size


def distill(recipe: DistillRecipe, teacher_ckpt: str, student_ckpt: str,
            out_dir: str | Path) -> dict[str, Any]:
    """Distill ``teacher_ckpt`` into ``student_ckpt``; checkpoints under ``out_dir``."""
    from nemo_minitron.checkpoint.io import (
        check_checkpoint,
        load_checkpoint_tokenizer,
        load_model,
        load_model_config,
    )
    from nemo_minitron.data.resolve import check_data
    from nemo_minitron.model.build import training_sequence_parallel
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.train.pretrain import bf16_enabled

    check_checkpoint(teacher_ckpt, "--teacher")
    check_checkpoint(student_ckpt, "--student")
    t_cfg, s_cfg = load_model_config(teacher_ckpt), load_model_config(student_ckpt)
    p = recipe.parallel
    t_cfg.check_layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    shared_vocab = _check_pair(teacher_ckpt, student_ckpt, t_cfg, s_cfg,
                               p.tensor_model_parallel_size, recipe.train.seq_length)
    if not recipe.instruct.enabled:
        check_data(recipe.data, load_checkpoint_tokenizer(student_ckpt))  # the teacher's too
    pairs = layer_pairs(student_ckpt, s_cfg.num_layers, t_cfg.num_layers, recipe.kd.layer_map)
    cache = None
    if recipe.kd.teacher_cache is not None:
        from nemo_minitron.distill.cache_format import open_cache
        from nemo_minitron.distill.teacher_cache import check_compatible

        cache = open_cache(recipe.kd.teacher_cache)
        check_compatible(cache, recipe, recipe.train.seq_length or s_cfg.seq_length,
                         s_cfg.vocab_size)
    if recipe.kd.on_policy.fraction > 0:
        recipe.kd.on_policy.check_room(recipe.train.seq_length or s_cfg.seq_length)
    init_distributed(recipe.parallel, seed=recipe.train.seed)
    bf16 = bf16_enabled(recipe)
    # An MoE student under TP trains with sequence parallelism; its teacher is built the same
    # way, so that both hidden states travel between pipeline stages as sequence shards.
    sp = training_sequence_parallel(s_cfg)
    student, _, tokenizer = load_model(student_ckpt, bf16=bf16, field="--student",
                                       sequence_parallel=sp)
    teacher = None
    if cache is None:  # with a cache the teacher never runs
        teacher, _, _ = load_model(teacher_ckpt, bf16=bf16, field="--teacher",
                                   sequence_parallel=sp)
    elif (key := (cache.path.resolve(), Path(teacher_ckpt).resolve())) not in _cache_checked:
        # Loaded (once per process: a search's candidates share it) in the cache build's
        # precision, to compare weights fingerprints.
        model, _, _ = load_model(teacher_ckpt, bf16=cache.meta.get("teacher_bf16", bf16),
                                 field="--teacher")
        check_teacher(cache, teacher_ckpt, model)
        del model
        _cache_checked.add(key)
    return distill_models(recipe, teacher, student, s_cfg, tokenizer,
                          out_dir, pairs=pairs, shared_vocab=shared_vocab, cache=cache)


def teacher_validation_loss(teacher: torch.nn.Module, valid_ds: Any, train_ds: Any,
                            t: TrainConfig) -> tuple[float, str, int]:
    """(LM loss, split, sequences) of ``teacher`` on the training loop's own validation set
    (its first ``eval_iters`` global batches), so the figure is the one the loop would report
    for the teacher; the training split when there is no validation split."""
    from nemo_minitron.data.datasets import sequences
    from nemo_minitron.model.forward import lm_loss

    split, data = ("validation", valid_ds) if valid_ds is not None else ("training", train_ds)
    n = min(t.eval_iters * t.global_batch_size, len(data))
    mbs = min(t.micro_batch_size, n)  # a set smaller than a micro-batch (instruction data)
    n -= n % mbs
    return lm_loss(teacher, sequences(data, n), mbs), split, n


def distill_models(recipe: DistillRecipe, teacher: torch.nn.Module | None,
                   student: torch.nn.Module, student_cfg: ModelConfig, tokenizer: Any,
                   out_dir: str | Path, *, pairs: list[tuple[int, int]] | None = None,
                   shared_vocab: int | None = None,
                   cache: TeacherCache | None = None) -> dict[str, Any]:
    """The Python API: distill in-memory Megatron ``GPTModel`` stages (built under the current
    parallel state, e.g. by a user's own script) on ``recipe.data``; checkpoints of the student
    under ``out_dir``. ``pairs``: ``[(student_layer, teacher_layer)]`` for intermediate losses
    (default: ``recipe.kd.layer_map`` or evenly spaced). With ``cache`` (an opened teacher
    cache, ``recipe.kd.teacher_cache``) ``teacher`` may be None: its logits come from there."""
    from nemo_minitron.data.resolve import resolve_data
    from nemo_minitron.parallel.runtime import current_runtime
    from nemo_minitron.train.pretrain import make_trainer, run_trainer

    rt = current_runtime()
    if teacher is None and cache is None:
        raise ValueError("distill_models needs a teacher or a teacher cache")
    if cache is not None and shared_vocab is not None:
        raise ConfigError("kd.teacher_cache needs teacher and student of one padded vocabulary")
    if pairs is None:
        pairs = [] if teacher is None else layer_pairs(
            None, student_cfg.num_layers, teacher.config.num_layers, recipe.kd.layer_map)
    recipe = dataclasses.replace(recipe, model=student_cfg)
    t = recipe.train
    seq_length = t.seq_length or student_cfg.seq_length
    prefix, splits = None, None
    if recipe.instruct.enabled:
        splits = instruct_kd_splits(recipe.instruct, recipe.data, tokenizer, seq_length,
                                    validate=bool(t.eval_interval))
        if recipe.kd.on_policy.fraction > 0:  # seeds from the sample's position in the run
            recipe.kd.on_policy.check_room(seq_length)
            splits = dataclasses.replace(splits, train=Positioned(
                splits.train, t.train_iters * t.global_batch_size))
    else:
        prefix, tokenizer = resolve_data(recipe.data, tokenizer)

    if recipe.kd.on_policy.fraction > 0 and student.config.sequence_parallel:
        raise ConfigError("kd.on_policy.fraction: sampling from a student built with sequence "
                          "parallelism (an MoE student under TP > 1) is not supported; "
                          "use parallel.tensor_model_parallel_size=1")
    sampler = OnPolicySampler(recipe.kd.on_policy, eod=tokenizer.eod,
                              stop_tokens=tokenizer.eos_ids, vocab_limit=tokenizer.vocab_size) \
        if recipe.kd.on_policy.fraction > 0 else None

    def objective(model: torch.nn.Module) -> KDObjective:
        if teacher is not None:
            add_projections(model, teacher.config.hidden_size,
                            pairs if recipe.kd.hidden_weight else [],
                            recipe.kd.embedding_weight > 0, recipe.train.seed)
        t = recipe.train
        return KDObjective(teacher, model, recipe.kd, rt.device, pairs=pairs,
                           shared_vocab=shared_vocab,
                           num_microbatches=t.global_batch_size // (t.micro_batch_size * rt.dp),
                           cache=cache, sampler=sampler)

    trainer = make_trainer(recipe, rt, student_cfg, tokenizer, prefix, out_dir, model=student,
                           objective=objective, splits=splits)
    if teacher is not None:
        measure = teacher_response_loss if recipe.instruct.enabled else teacher_validation_loss
        teacher_loss, split, n = measure(teacher, trainer.valid_ds, trainer.train_ds,
                                         recipe.train)
    else:  # measured when the cache was built, on the same sequences
        assert cache is not None
        teacher_loss = float(cache.meta["teacher_valid_loss"])
        split = cache.meta.get("teacher_loss_split", "validation")
        n = int(cache.meta.get("teacher_loss_sequences", 0))
    ceiling = math.log(tokenizer.vocab_size)
    log.info("teacher loss on the %s split (%d sequences, the loop's validation set) %.4f "
             "(ln(vocab) = %.4f)", split, n, teacher_loss, ceiling)
    if teacher_loss > recipe.kd.teacher_max_loss_ratio * ceiling:
        raise ConfigError(f"the teacher looks untrained: validation loss {teacher_loss:.3f} > "
                          f"kd.teacher_max_loss_ratio={recipe.kd.teacher_max_loss_ratio} x "
                          f"ln(vocab)={ceiling:.3f}")
    summary = run_trainer(trainer, out_dir)
    summary["teacher_valid_loss"] = teacher_loss
    return summary

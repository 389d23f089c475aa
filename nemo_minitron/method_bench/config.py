"""The method benchmark's recipe (``recipes/method_bench.yaml``): the teacher to pretrain, the
pruned shapes, the retraining budget every arm shares, and the seeds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_minitron.config import (
    ConfigError,
    Recipe,
    TrainConfig,
    from_dict,
    load_yaml,
    merge,
    parse_overrides,
)
from nemo_minitron.distill.objective import KDConfig
from nemo_minitron.eval.bench import BenchConfig
from nemo_minitron.prune.stage import CalibConfig
from nemo_minitron.utils.paths import recipes_dir

TEACHER_RECIPE = recipes_dir() / "tiny_cpu.yaml"
DEFAULT_RECIPE = recipes_dir() / "method_bench.yaml"

SECTIONS = ("teacher", "aggregation", "criteria", "width_depth", "kd_vs_ce", "intermediate",
            "scratch", "iterative", "throughput")


def _retrain() -> TrainConfig:
    return TrainConfig(train_iters=200, lr=1e-3, min_lr=1e-4, lr_warmup_iters=10,
                       eval_interval=25, eval_iters=8, log_interval=25)


@dataclass(kw_only=True)
class StudyConfig:
    """What is compared, and how often."""

    teacher: str | None = None
    """An existing teacher checkpoint (trained with the ``teacher`` recipe's data); None
    pretrains one under ``<out>/teacher`` (resumed when interrupted)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Seed offsets of the key comparisons: each moves data.seed (calibration set, training
    order) and train.seed. Every loss in the report is measured on one fixed validation set."""
    depth_num_layers: int | None = None
    """Layers of the depth-pruned student; None: half the teacher's."""
    width_hidden_size: int | None = None
    """hidden_size of the width-pruned student (its ffn_hidden_size is then chosen so that it has
    the depth student's parameter count); None: 3/4 of the teacher's."""
    width_ffn_step: int = 64
    """The width student's ffn_hidden_size is a multiple of this."""
    hidden_weight: float = 1.0
    """kd.hidden_weight of the logit+intermediate arm (cosine loss on every mapped layer)."""
    iterative_steps: int = 2
    """Prune-and-re-estimate rounds of the iterative-importance arm (widths evenly spaced)."""
    scratch_full_seeds: int = 1
    """Seeds of the from-scratch run with the teacher's whole token budget (the most
    expensive arm; the equal-budget scratch run uses every seed)."""
    eval_samples: int = 64
    """Sequences of the fixed validation set (equal to retrain eval_iters x global_batch_size,
    so training curves at the first seed are on the same set)."""
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    """Sections to run and report."""

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"study.seeds={self.seeds} must be distinct and non-empty")
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"study.sections names {unknown[0]!r}; known: {', '.join(SECTIONS)}")
        if self.iterative_steps < 2:
            raise ConfigError(f"study.iterative_steps={self.iterative_steps} must be >= 2")
        if not 1 <= self.scratch_full_seeds <= len(self.seeds):
            raise ConfigError(f"study.scratch_full_seeds={self.scratch_full_seeds} must be "
                              f"between 1 and len(study.seeds)={len(self.seeds)}")


@dataclass(kw_only=True)
class MethodBenchRecipe:
    """Everything ``bench-method`` reads."""

    study: StudyConfig = field(default_factory=StudyConfig)
    """Arms, seeds, shapes."""
    teacher: Recipe = field(default_factory=Recipe)
    """Pretraining recipe of the teacher (defaults: ``recipes/tiny_cpu.yaml``); its ``data``
    is every stage's data."""
    calib: CalibConfig = field(default_factory=CalibConfig)
    """Importance estimation of every prune."""
    retrain: TrainConfig = field(default_factory=_retrain)
    """The loop of every retraining arm (distillation, cross-entropy, equal-budget scratch)."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Distillation losses of the logit-only arms."""
    throughput: BenchConfig = field(default_factory=BenchConfig)
    """Sizes of the throughput measurement."""

    def __post_init__(self) -> None:
        t = self.retrain
        if not t.eval_interval or t.train_iters % t.eval_interval:
            raise ConfigError(f"retrain.eval_interval={t.eval_interval} must be > 0 and divide "
                              f"retrain.train_iters={t.train_iters} (curves end at the last step)")


def load_bench_recipe(path: str | Path | None, overrides: list[str]) -> MethodBenchRecipe:
    """The teacher section starts from ``recipes/tiny_cpu.yaml``; then the recipe, then
    ``key=value`` overrides."""
    data: dict[str, Any] = {"teacher": load_yaml(TEACHER_RECIPE)}
    data = merge(data, load_yaml(path or DEFAULT_RECIPE))
    data = merge(data, parse_overrides(overrides))
    return from_dict(MethodBenchRecipe, data)

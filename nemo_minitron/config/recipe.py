"""Recipes: the data and training sections, the recipe every verb's recipe derives from, and
loading one from YAML plus overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from nemo_minitron.config.dicts import from_dict, load_yaml, merge, parse_overrides
from nemo_minitron.config.errors import ConfigError, positive
from nemo_minitron.config.model import ModelConfig, ParallelConfig

T = TypeVar("T")


@dataclass(kw_only=True)
class DataConfig:
    """Where training tokens come from."""

    path: str | None = None
    """Indexed-dataset prefix (without .bin/.idx); None builds the embedded corpus, tokenized
    by the checkpoint's own tokenizer when a verb reads a checkpoint. A dataset written by
    another tokenizer than the one reading it is refused (``data.resolve``)."""
    tokenizer: str | None = None
    """Tokenizer: a sentencepiece .model file or a Hugging Face tokenizer directory; None
    trains a sentencepiece BPE model on the embedded corpus. Verbs that read a checkpoint use
    its tokenizer (this one, if set, must equal it)."""
    cache_dir: str = "~/.cache/nemo_minitron"
    """Where the embedded corpus, its tokenizer and its indexed dataset are built once."""
    tokenizer_vocab_size: int = 4000
    """Vocabulary of the sentencepiece model trained on the embedded corpus."""
    corpus_max_bytes: int = 8_000_000
    """Upper bound on the embedded corpus size (standard-library source, sorted by path)."""
    split: str = "95,5,0"
    """Train/valid/test split weights of the documents (Megatron's ``split``)."""
    seed: int = 1234
    """Seed of Megatron's dataset shuffling."""

    def __post_init__(self) -> None:
        positive("data.tokenizer_vocab_size", self.tokenizer_vocab_size)
        positive("data.corpus_max_bytes", self.corpus_max_bytes)
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            raise ConfigError(f"data.split={self.split!r} must be three numbers 'train,valid,test'")
        if sum(float(p) for p in parts) <= 0:
            raise ConfigError(f"data.split={self.split!r} must give some documents a split "
                              "(the weights sum to 0)")


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop (pretraining, fine-tuning and, later, distillation)."""

    micro_batch_size: int = 8
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    train_iters: int = 100
    """Optimizer steps."""
    seq_length: int | None = None
    """Training window (tokens per sequence); None: ``model.seq_length``. Lets ``distill`` and
    fine-tuning of an imported model train on windows shorter than its context."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Final learning rate of the cosine decay."""
    lr_warmup_iters: int = 10
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    bf16: bool | None = None
    """bf16 mixed precision; None means on with a GPU, off (fp32) on CPU."""
    seed: int = 1234
    """Seed of weight initialisation and of every RNG."""
    log_interval: int = 10
    """Steps between log lines (loss, tokens/s, ETA)."""
    eval_interval: int = 50
    """Steps between validation runs (0 disables periodic validation)."""
    eval_iters: int = 4
    """Validation batches (of global_batch_size sequences) per validation run."""
    save_interval: int = 0
    """Steps between checkpoints (0: only the final checkpoint and on SIGTERM/SIGUSR1)."""
    exit_interval: int = 0
    """Save and stop when the step is a multiple of this (time-sliced jobs); 0 disables."""
    tensorboard: bool = True
    """Write TensorBoard scalars under <out>/tensorboard."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "train_iters", "log_interval",
                     "eval_iters"):
            positive(f"train.{name}", getattr(self, name))
        if self.seq_length is not None:
            positive("train.seq_length", self.seq_length)
        for name in ("lr_warmup_iters", "eval_interval", "save_interval", "exit_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        for name in ("lr", "min_lr", "weight_decay", "clip_grad"):
            value = getattr(self, name, 0.0)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"train.{name}={value} must be a finite number")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"train.lr={self.lr}, train.min_lr={self.min_lr}: need "
                              "0 <= min_lr <= lr and lr > 0")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size={self.micro_batch_size}"
            )


@dataclass(kw_only=True)
class StageRecipe:
    """What every verb's recipe holds: the parallel layout and the data. Each verb's recipe
    derives from it and adds its own sections (``Recipe``: model + train; the prune, distill
    and search recipes: their sections); every section validates itself when it is built,
    the recipe checks what spans sections."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training (or calibration) data."""


@dataclass(kw_only=True)
class Recipe(StageRecipe):
    """A training recipe (pretrain, finetune): model shape and training loop."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape (used when a stage builds a model from scratch)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""

    def validate_parallel(self, world_size: int) -> int:
        """Check the layout against the world size and the model; return the DP size."""
        p, m = self.parallel, self.model
        mp = p.model_parallel_size
        if world_size % mp:
            raise ConfigError(
                f"parallel: tensor_model_parallel_size * pipeline_model_parallel_size = {mp} "
                f"does not divide the world size {world_size}"
            )
        m.check_layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                       p.expert_model_parallel_size)
        dp = world_size // mp
        t = self.train
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size * data-parallel size = {t.micro_batch_size * dp}"
            )
        return dp


def load_recipe(path: str | Path | None, overrides: list[str] | None = None,
                cls: type[T] = Recipe) -> T:  # type: ignore[assignment]
    """Load a recipe file (or defaults when ``path`` is None) and apply overrides. A
    ``cluster:`` section holds the job's resources for ``launch``/``validate``
    (``launch.sbatch.ClusterConfig``, checked there); the verb itself ignores it."""
    data = load_yaml(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides or []))
    data.pop("cluster", None)
    return from_dict(cls, data)

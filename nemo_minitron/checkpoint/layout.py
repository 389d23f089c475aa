"""The checkpoint directory format: the one owner of its file and directory names.

Layout::

    <ckpt>/
      model_config.yaml   ModelConfig (Megatron field names); enough to rebuild the model
      tokenizer/          the tokenizer files (tokenizer.model or a Hugging Face directory)
      weights/            model weights, Megatron distributed checkpoint (torch_dist)
      optimizer/          optimizer state, distributed checkpoint (training checkpoints only)
      train_state.json    step, consumed samples, LR-scheduler state, the recipe
      metadata.json       what later stages need from the stage that wrote it (optional;
                          e.g. ``pruning``: kept layers, source shape, importance method;
                          ``merge``: how a merged checkpoint was made)
      rng/rank_*.pt       per-rank RNG states (tensors only: loaded with weights_only=True)
      manifest.json       every file's size and checksum (``checkpoint.manifest``), last

Other packages reach these files through the functions here (``weights_dir``,
``tokenizer_dir``, ...), never by name.
"""

from __future__ import annotations

import os
from pathlib import Path

from nemo_minitron.config import ConfigError

MODEL_CONFIG = "model_config.yaml"
METADATA = "metadata.json"
TOKENIZER = "tokenizer"
WEIGHTS = "weights"
OPTIMIZER = "optimizer"
TRAIN_STATE = "train_state.json"
RNG = "rng"
CHECKPOINTS = "checkpoints"
"""Training checkpoints of a run live in ``<run_dir>/checkpoints/step_<NNNNNNN>``."""
ALL_PARTS = (MODEL_CONFIG, TOKENIZER, WEIGHTS, OPTIMIZER, TRAIN_STATE, RNG)
"""The parts a checkpoint's manifest is checked by (``checkpoint.io.verify_checkpoint``)."""


def weights_dir(ckpt: str | os.PathLike[str]) -> Path:
    """The distributed checkpoint of a checkpoint's model weights."""
    return Path(ckpt) / WEIGHTS


def tokenizer_dir(ckpt: str | os.PathLike[str]) -> Path:
    """The directory of a checkpoint's tokenizer files."""
    return Path(ckpt) / TOKENIZER


def staging_dir(ckpt: str | os.PathLike[str]) -> Path:
    """Where a checkpoint is written before it is renamed into place."""
    p = Path(ckpt)
    return p.with_name(p.name + ".tmp")


def step_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """The checkpoint directory of training step ``step`` in a run directory."""
    return Path(run_dir) / CHECKPOINTS / f"step_{int(step):07d}"


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A complete checkpoint directory."""
    p = Path(path)
    return (p / MODEL_CONFIG).is_file() and weights_dir(p).is_dir()


def check_checkpoint(path: str | os.PathLike[str], field: str = "checkpoint") -> Path:
    """One-line error unless ``path`` is a complete checkpoint."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{field}={str(path)!r} does not exist")
    if not is_checkpoint(p):
        raise ConfigError(f"{field}={str(path)!r} is not a nemo_minitron checkpoint "
                          f"(no {MODEL_CONFIG} and {WEIGHTS}/)")
    return p


def has_tokenizer(path: str | os.PathLike[str]) -> bool:
    """Whether a checkpoint holds a tokenizer (an import from files without one does not)."""
    d = tokenizer_dir(path)
    return d.is_dir() and any(d.iterdir())

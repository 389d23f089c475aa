"""Perplexity of a checkpoint on an indexed dataset or on text / JSONL files.

The documents (each followed by the tokenizer's eod, as in training data) are concatenated into
one token stream cut into non-overlapping windows of ``seq_length + 1`` tokens (the partial tail
is dropped); every window's next-token loss comes from ``model.forward.lm_loss`` (through the
pipeline schedule, so any TP/PP layout works). All windows hold the same number of tokens, so
the mean of per-window losses is the token mean, and perplexity is its exponential.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nemo_minitron.config import ConfigError, ParallelConfig
from nemo_minitron.utils.logging import get_logger, warn_once

log = get_logger("eval")


@dataclass(kw_only=True)
class PerplexityConfig:
    """What ``eval`` measures the perplexity on."""

    data_path: str | None = None
    """Indexed-dataset prefix (without .bin/.idx), tokenized with the checkpoint's tokenizer."""
    seq_length: int | None = None
    """Window length; None takes the checkpoint's model.seq_length."""
    max_windows: int = 0
    """Evaluate at most this many windows (0: all)."""
    micro_batch_size: int = 4
    """Windows per forward pass."""

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ConfigError(f"--micro-batch-size={self.micro_batch_size} must be >= 1")
        if self.seq_length is not None and self.seq_length < 1:
            raise ConfigError(f"--seq-length={self.seq_length} must be >= 1")
        if self.max_windows < 0:
            raise ConfigError(f"--max-windows={self.max_windows} must be >= 0 (0: all)")


def token_windows(docs: Iterator[np.ndarray], seq_length: int, max_windows: int = 0
                  ) -> torch.Tensor:
    """``[n, seq_length + 1]`` windows of the concatenated documents."""
    width = seq_length + 1
    buf: list[np.ndarray] = []
    have = 0
    for doc in docs:
        buf.append(np.asarray(doc, dtype=np.int64))
        have += len(doc)
        if max_windows and have >= max_windows * width:
            break
    n = have // width
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise ConfigError(f"the data hold {have} tokens, fewer than one window of {width}")
    return torch.from_numpy(np.concatenate(buf)[:n * width].reshape(n, width))


def perplexity(checkpoint: str, cfg: PerplexityConfig, files: list[str] | None = None,
               parallel: ParallelConfig | None = None) -> dict[str, Any]:
    """``{"loss", "perplexity", "tokens", "windows"}`` of ``checkpoint`` on the data (known on
    every rank)."""
    from nemo_minitron.checkpoint.io import load_checkpoint_tokenizer, load_model, load_model_config
    from nemo_minitron.data.indexed import (
        check_indexed_prefix,
        iter_input_documents,
        read_indexed_documents,
    )
    from nemo_minitron.data.resolve import check_prefix_tokenizer
    from nemo_minitron.model.forward import lm_loss

    if (cfg.data_path is None) == (not files):
        raise ConfigError("eval: give either --data PREFIX or text/JSONL files")
    model_cfg = load_model_config(checkpoint)
    seq = cfg.seq_length or model_cfg.seq_length
    tok = load_checkpoint_tokenizer(checkpoint)
    if seq > model_cfg.context_length:
        warn_once(log, f"--seq-length={seq} is past the model's context length "
                  f"{model_cfg.context_length}: positions beyond it were never trained, so the "
                  f"loss says little about the model")
    if cfg.data_path is not None:
        check_indexed_prefix(cfg.data_path, "data")
        check_prefix_tokenizer(cfg.data_path, tok, "--data")
        docs: Iterator[np.ndarray] = read_indexed_documents(cfg.data_path)
    else:
        docs = (np.array(tok.encode(text) + [tok.eod]) for text in iter_input_documents(files))
    windows = token_windows(docs, seq, cfg.max_windows)
    mbs = min(cfg.micro_batch_size, len(windows))
    windows = windows[:len(windows) // mbs * mbs]
    model, _, _ = load_model(checkpoint, parallel or ParallelConfig())
    loss = lm_loss(model, windows, mbs)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(windows.shape[0] * seq),
            "windows": int(windows.shape[0])}

"""Offline teacher logits: the teacher's top-k log-probabilities of every training token,
computed once and read by distillation instead of running the teacher.

The architecture search distills every candidate from the same teacher on the same data, so it
runs the same teacher forward passes once per candidate; with a cache it runs them once.

A cache directory::

    ids.npy     [num_samples, seq_length, k] int32    the teacher's k most likely token ids
    logp.npy    [num_samples, seq_length, k] float32  their log-probabilities (full softmax)
    tail.npy    [num_samples, seq_length] float32     log of the teacher's mass outside them
    check.npy   [num_samples] int64                   a checksum of each sample's tokens
    done/       one marker per finished chunk of samples (a killed build resumes)
    valid/      the same four arrays and done/ for the validation split's fixed samples (the
                first train.eval_iters x train.global_batch_size, which every validation reads)
    meta.json   written last: k, shapes, the teacher (its path and ``weights_fingerprint``:
                another teacher is refused), the data, the teacher's validation loss.

It is built (``cache_build``) in ``.<name>.partial`` beside it, renamed when finished, so the
path holds a finished cache or nothing; a killed build resumes from the partial directory.

Sample ``i`` is the training dataset's sample ``i`` (``data.datasets.micro_batches`` hands each
micro-batch's dataset indices to the objective as ``sample_index``), and in ``valid/`` the
validation dataset's; the checksum catches a cache used with other data. The arrays are
``.npy`` files read with ``allow_pickle=False``.

The loss computed from it: ``distill.cache_kl``; the job that builds it: ``distill.cache_build``;
the checks a run makes against it: ``distill.teacher_cache``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_minitron.config import ConfigError

META = "meta.json"
CHUNK_SAMPLES = 32
"""Samples per resumable unit of the build."""


def token_checksum(tokens: torch.Tensor) -> torch.Tensor:
    """``[b]`` int64 checksum of ``tokens [b, s]`` (position-weighted, so order matters)."""
    pos = torch.arange(1, tokens.shape[-1] + 1, dtype=torch.int64, device=tokens.device)
    return ((tokens.long() + 1) * pos).sum(-1) % 2_147_483_647


@dataclass
class TeacherCache:
    """An opened, complete cache (memory-mapped, read-only)."""

    path: Path
    meta: dict[str, Any]
    ids: np.ndarray
    logp: np.ndarray
    tail: np.ndarray
    check: np.ndarray
    valid: TeacherCache | None = None
    """The validation split's samples (``valid/``); None when the cache was built without
    validation (train.eval_interval=0)."""

    def rows(self, index: torch.Tensor, tokens: torch.Tensor, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids [b, s, k], logp [b, s, k], tail [b, s])`` of dataset samples ``index [b]``
        whose input tokens are ``tokens [b, s]``; a one-line error if the cache saw others."""
        idx = index.cpu().numpy()
        if idx.max(initial=0) >= len(self.check):
            raise ConfigError(f"teacher cache {str(self.path)!r} holds {len(self.check)} samples; "
                              f"the run needs sample {int(idx.max())} (rebuild it for "
                              "train.train_iters x train.global_batch_size samples)")
        if not np.array_equal(self.check[idx], token_checksum(tokens.cpu()).numpy()):
            raise ConfigError(f"teacher cache {str(self.path)!r} was built on other data "
                              "(token checksums differ): use the same data.* settings")
        return tuple(torch.from_numpy(np.ascontiguousarray(a[idx])).to(device)
                     for a in (self.ids, self.logp, self.tail))  # type: ignore[return-value]


ARRAYS = ("ids", "logp", "tail", "check")


def _open_arrays(p: Path, want: tuple[int, int, int], path: str) -> list[np.ndarray]:
    try:
        arrays = [np.load(p / f"{f}.npy", mmap_mode="r", allow_pickle=False) for f in ARRAYS]
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher cache {path!r} is unreadable: {e}") from None
    ids, logp, tail, check = arrays
    if ids.shape != want or logp.shape != want or tail.shape != want[:2] \
            or check.shape != want[:1]:
        raise ConfigError(f"teacher cache {path!r}: array shapes {ids.shape}, "
                          f"{logp.shape}, {tail.shape}, {check.shape} do not match {META} {want}")
    return arrays


def open_cache(path: str | os.PathLike[str]) -> TeacherCache:
    """Open a finished cache; one-line errors for a missing or unfinished one."""
    p = Path(path)
    if not (p / META).is_file():
        raise ConfigError(f"kd.teacher_cache={str(path)!r} is not a finished teacher cache "
                          f"(no {META}; build it with `nemo-minitron teacher-cache`)")
    try:
        meta = json.loads((p / META).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"teacher cache {str(path)!r} is unreadable: {e}") from None
    want = (meta["num_samples"], meta["seq_length"], meta["top_k"])
    cache = TeacherCache(p, meta, *_open_arrays(p, want, str(path)))
    if meta.get("valid_samples"):
        want = (meta["valid_samples"], *want[1:])
        cache.valid = TeacherCache(p / "valid", meta, *_open_arrays(p / "valid", want,
                                                                   str(path)))
    return cache


def data_key(recipe: Any) -> dict[str, Any]:
    """What must agree between a cache and a run reading it."""
    d = recipe.data
    return {"path": d.path, "tokenizer": d.tokenizer, "split": d.split, "seed": d.seed,
            "cache_dir": None if d.path else str(Path(d.cache_dir).expanduser()),
            "corpus_max_bytes": None if d.path else d.corpus_max_bytes,
            "tokenizer_vocab_size": None if d.path or d.tokenizer else d.tokenizer_vocab_size}

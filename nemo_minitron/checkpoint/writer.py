"""The one checkpoint writer: every checkpoint (a training save, a pruned model, a merge) is
staged in ``<ckpt>.tmp``, gets its model config, tokenizer, metadata and manifest here, and is
renamed into place by rank 0. What a caller writes itself is only its weights (and optimizer
and RNG state) into the staging directory."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from nemo_minitron.checkpoint.layout import (
    METADATA,
    MODEL_CONFIG,
    TOKENIZER,
    TRAIN_STATE,
    WEIGHTS,
    staging_dir,
)
from nemo_minitron.checkpoint.manifest import write_manifest
from nemo_minitron.config import ConfigError, ModelConfig, to_dict
from nemo_minitron.data.tokenizer import Tokenizer
from nemo_minitron.utils.fs import atomic_write_json, atomic_write_text, replace_dir
from nemo_minitron.utils.logging import get_logger
from nemo_minitron.utils.rank import barrier, global_rank

log = get_logger("checkpoint")


@contextlib.contextmanager
def checkpoint_writer(path: str | os.PathLike[str], *, model_cfg: ModelConfig,
                      tokenizer: Tokenizer | None, metadata: dict[str, Any] | None = None,
                      train_state: dict[str, Any] | None = None,
                      parts: Sequence[str] = (WEIGHTS,), overwrite: bool = False
                      ) -> Iterator[Path]:
    """Collectively write the checkpoint ``path`` (every rank enters): rank 0 makes the staging
    directory with the ``parts`` directories, every rank writes its share into the directory
    yielded, then rank 0 adds the model config, the tokenizer, ``train_state`` and
    ``metadata`` (JSON, read back by ``checkpoint.io.load_metadata``), the manifest last, and
    renames it to ``path``. On failure the staging directory is removed (an existing ``path``
    is untouched); a full disk is a one-line ``ConfigError`` naming the directory."""
    t0 = time.perf_counter()
    final = Path(path)
    tmp = staging_dir(final)
    try:
        if global_rank() == 0:
            if final.exists() and not overwrite:
                raise FileExistsError(f"checkpoint {final} already exists")
            shutil.rmtree(tmp, ignore_errors=True)
            for part in parts:
                (tmp / part).mkdir(parents=True)
        barrier()
        yield tmp
        barrier()
        if global_rank() == 0:
            atomic_write_text(tmp / MODEL_CONFIG,
                              yaml.safe_dump(to_dict(model_cfg), sort_keys=False))
            if tokenizer is not None:
                tokenizer.save(tmp / TOKENIZER)
            if train_state is not None:
                atomic_write_json(tmp / TRAIN_STATE, train_state)
            if metadata is not None:
                atomic_write_json(tmp / METADATA, metadata)
            t_sum = time.perf_counter()
            entries = write_manifest(tmp)  # last: it covers every file
            t_sum = time.perf_counter() - t_sum
            replace_dir(tmp, final, overwrite=True)  # existence was refused above
            log.info("saved checkpoint %s in %.2fs (checksums of %.1f MB: %.2fs)", final,
                     time.perf_counter() - t0,
                     sum(e["size"] for e in entries.values()) / 1e6, t_sum)
        barrier()
    except BaseException as e:  # torch's CheckpointException is a BaseException
        full = no_space_left(e, final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise ConfigError(f"no space left on the device holding {final.parent} (saving "
                              f"{final.name}; the partial copy was removed)") from None
        raise


def no_space_left(exc: BaseException, where: str | os.PathLike[str]) -> bool:
    """Whether ``exc`` (or its cause) comes from a full disk. torch's writers do not always
    say so (``unexpected pos 704 vs 598``): then a device left with under 1 MiB counts."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT) \
                or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False

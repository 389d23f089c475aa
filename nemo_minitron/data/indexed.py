"""Write Megatron indexed datasets (``.bin``/``.idx``) from documents, and prepare inputs.

Documents are tokenized, an end-of-document token appended, and written with
``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``, with a record of the
tokenizer that made it (``<prefix>.tokenizer.json``: ``tokenizer_fingerprint``, its label, the
largest token id), so that a checkpoint of another tokenizer is not fed its ids. All files are
written to temporary names and renamed at the end (``.idx`` last), so an interrupted build
leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from nemo_minitron.config import ConfigError
from nemo_minitron.data.tokenizer import Tokenizer, tokenizer_fingerprint, tokenizer_label
from nemo_minitron.utils.logging import get_logger

log = get_logger("data.indexed")

TOKENIZER_RECORD = ".tokenizer.json"
"""Suffix of the record beside ``<prefix>.bin/.idx`` naming the tokenizer that wrote them."""


def write_indexed_dataset(documents: Iterable[str], tokenizer: Tokenizer,
                          out_prefix: str | os.PathLike[str], *, total: int | None = None,
                          append_eod: bool = True, progress: bool = True,
                          tokenizer_name: str | None = None) -> dict[str, int]:
    """Tokenize ``documents`` into ``<out_prefix>.bin/.idx`` (and the tokenizer record, naming
    it ``tokenizer_name`` or ``tokenizer_label``); return document/token counts."""
    from megatron.core.datasets.indexed_dataset import (
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )
    from tqdm import tqdm

    prefix = str(out_prefix)
    parent = Path(prefix).absolute().parent
    created = [d for d in (parent, *parent.parents) if not d.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    tmp = f"{prefix}.tmp-{os.getpid()}"
    tmp_files = (get_bin_path(tmp), get_idx_path(tmp), tmp + TOKENIZER_RECORD)
    builder = IndexedDatasetBuilder(get_bin_path(tmp), dtype=dtype)
    n_docs = n_tokens = n_text = max_id = 0
    try:
        for doc in tqdm(documents, total=total, desc="tokenize", unit="doc",
                        disable=not progress, mininterval=2.0):
            ids = tokenizer.encode(doc)
            n_text += bool(ids)
            if append_eod:
                ids.append(tokenizer.eod)
            if not ids:
                continue
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            max_id = max(max_id, max(ids))
            n_docs += 1
            n_tokens += len(ids)
        builder.finalize(get_idx_path(tmp))
        if n_text == 0:  # empty documents alone would be a data set of end-of-document tokens
            raise ConfigError("data: the inputs hold no non-empty document")
        record = {"fingerprint": tokenizer_fingerprint(tokenizer),
                  "tokenizer": tokenizer_name or tokenizer_label(tokenizer),
                  "max_token_id": max_id}
        Path(tmp_files[2]).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        os.replace(get_bin_path(tmp), get_bin_path(prefix))
        os.replace(tmp_files[2], prefix + TOKENIZER_RECORD)
        os.replace(get_idx_path(tmp), get_idx_path(prefix))
    except BaseException:
        for path in tmp_files:
            if os.path.exists(path):
                os.unlink(path)
        for d in created:  # innermost first: directories this call made, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    finally:
        for path in tmp_files:
            if os.path.exists(path):
                os.unlink(path)
    log.info("wrote %s.{bin,idx}: %d documents, %d tokens", prefix, n_docs, n_tokens)
    return {"documents": n_docs, "tokens": n_tokens}


def read_indexed_documents(prefix: str | os.PathLike[str]) -> Iterator[np.ndarray]:
    """Token arrays of every document of an indexed dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    for i in range(len(ds)):
        yield np.array(ds[i])  # a copy: ds[i] is a view of an mmap closed with ds


def tokenizer_record(prefix: str) -> dict[str, object] | None:
    """The record of the tokenizer that wrote ``prefix`` (None for a data set written without
    one: by an older version or another tool); one-line error for a malformed record."""
    f = Path(prefix + TOKENIZER_RECORD)
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{f} is unreadable ({type(e).__name__}): rebuild the data set") from None
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str) \
            or not isinstance(record.get("max_token_id"), int):
        raise ConfigError(f"{f} is not a tokenizer record (a JSON object with 'fingerprint' "
                          "and 'max_token_id')")
    return record


def max_token_id(prefix: str) -> int:
    """The largest token id of an indexed data set: its tokenizer record's, else a scan."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path

    record = tokenizer_record(prefix)
    if record is not None:
        return int(record["max_token_id"])  # type: ignore[call-overload]
    dtype = IndexedDataset(prefix).index.dtype
    tokens = np.memmap(get_bin_path(prefix), dtype=dtype, mode="r")
    return int(tokens.max()) if tokens.size else 0


def check_indexed_prefix(prefix: str, field: str = "data.path") -> None:
    """Raise a one-line error unless ``<prefix>.bin`` and ``<prefix>.idx`` exist."""
    for ext in (".bin", ".idx"):
        if not Path(prefix + ext).is_file():
            raise ConfigError(f"{field}={prefix!r}: {prefix}{ext} does not exist")


def iter_input_documents(paths: list[str], json_key: str = "text") -> Iterator[str]:
    """Documents from ``.jsonl`` files (one per line, field ``json_key``) and text files (one
    document per file)."""
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"input {path!r} does not exist")
        if p.suffix in (".jsonl", ".json"):
            for lineno, line in enumerate(_utf8_text(p).split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ConfigError(f"{path}:{lineno} is not valid JSON") from None
                if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                    raise ConfigError(f"{path}:{lineno} has no string field {json_key!r}")
                yield record[json_key]
        else:
            yield _utf8_text(p)


def _utf8_text(p: Path) -> str:
    """A text input file's content; one-line errors for binary or non-UTF-8 files."""
    data = p.read_bytes()
    if b"\0" in data:
        raise ConfigError(f"input {str(p)!r} is a binary file (it holds NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"input {str(p)!r} is not UTF-8 text (byte {e.start})") from None

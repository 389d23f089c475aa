"""Build (once, cached) the embedded default: stdlib corpus -> BPE tokenizer -> indexed dataset.

The cache key holds the Python version and the corpus/tokenizer sizes, so every process of a
job (and every later job) reuses the same files. Rank 0 builds; the others wait at a barrier.
A checkpoint's own tokenizer (an imported model's) gets the same corpus tokenized by it, under
a key holding its ``tokenizer_fingerprint`` instead of the trained tokenizer's size; when it
is that trained tokenizer (a checkpoint pretrained here) the default build is reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from nemo_minitron.config import DataConfig
from nemo_minitron.data.corpus import read_documents, stdlib_files
from nemo_minitron.data.indexed import write_indexed_dataset
from nemo_minitron.data.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    same_tokenizer,
    tokenizer_fingerprint,
    tokenizer_label,
    train_sentencepiece,
)
from nemo_minitron.utils.fs import atomic_dir, atomic_write_json
from nemo_minitron.utils.logging import get_logger

log = get_logger("data.embedded")


def embedded_dir(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> Path:
    """Cache directory of the embedded corpus for this interpreter and these sizes, tokenized
    by its own trained tokenizer or by ``tokenizer``."""
    v = sys.version_info
    py = f"{v.major}.{v.minor}.{v.micro}"
    tok = f"v{cfg.tokenizer_vocab_size}" if tokenizer is None \
        else f"tok{tokenizer_fingerprint(tokenizer)[:16]}"
    return Path(cfg.cache_dir).expanduser() / f"stdlib-py{py}-{cfg.corpus_max_bytes}-{tok}"


def prepare_embedded(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> tuple[str, str]:
    """Return ``(dataset prefix, tokenizer file)`` of the embedded corpus tokenized by
    ``tokenizer`` (None: a sentencepiece model trained on it), building it once."""
    default = embedded_dir(cfg)
    out = default if tokenizer is None or _trained_here(default, tokenizer) \
        else embedded_dir(cfg, tokenizer)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not (out / "done.json").exists():
        files = stdlib_files(cfg.corpus_max_bytes)
        log.info("building the embedded corpus: %d standard-library files -> %s", len(files), out)
        with atomic_dir(out, overwrite=True) as tmp:
            tok = tokenizer if out != default else train_sentencepiece(
                read_documents(files), cfg.tokenizer_vocab_size, tmp / "tokenizer.model",
                "data.tokenizer_vocab_size")
            name = None if out != default else tokenizer_label(tok).replace(
                str(tmp), str(out), 1)  # where it will be once renamed
            stats = write_indexed_dataset(read_documents(files), tok, tmp / "corpus",
                                          total=len(files), tokenizer_name=name)
            atomic_write_json(tmp / "done.json", {**stats, "files": len(files)})
    if dist.is_initialized():
        dist.barrier()
    if out == default:
        return str(out / "corpus"), str(out / "tokenizer.model")
    assert tokenizer is not None and tokenizer.path is not None
    return str(out / "corpus"), str(tokenizer.path)


def _trained_here(default: Path, tokenizer: Tokenizer) -> bool:
    """Whether ``tokenizer`` is the one the default build trained (already built)."""
    if not (default / "done.json").exists():
        return False
    own = SentencePieceTokenizer(default / "tokenizer.model")
    return same_tokenizer(own, tokenizer)


def embedded_tokenizer(cfg: DataConfig) -> SentencePieceTokenizer:
    """The embedded corpus' tokenizer (building the corpus if needed)."""
    return SentencePieceTokenizer(prepare_embedded(cfg)[1])

"""Build (once, cached) the embedded default: stdlib corpus -> BPE tokenizer -> indexed dataset.

The cache key holds the Python version and the corpus/tokenizer sizes, so every process of a
job (and every later job) reuses the same files. Rank 0 builds; the others wait at a barrier.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from nemo_minitron.config import DataConfig
from nemo_minitron.data.corpus import read_documents, stdlib_files
from nemo_minitron.data.indexed import write_indexed_dataset
from nemo_minitron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from nemo_minitron.utils.fs import atomic_dir, atomic_write_json
from nemo_minitron.utils.logging import get_logger

log = get_logger("data.embedded")


def embedded_dir(cfg: DataConfig) -> Path:
    """Cache directory of the embedded corpus for this interpreter and these sizes."""
    v = sys.version_info
    py = f"{v.major}.{v.minor}.{v.micro}"
    key = f"stdlib-py{py}-{cfg.corpus_max_bytes}-v{cfg.tokenizer_vocab_size}"
    return Path(cfg.cache_dir).expanduser() / key


def prepare_embedded(cfg: DataConfig) -> tuple[str, str]:
    """Return ``(dataset prefix, tokenizer file)`` of the embedded corpus, building it once."""
    out = embedded_dir(cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not (out / "done.json").exists():
        files = stdlib_files(cfg.corpus_max_bytes)
        log.info("building the embedded corpus: %d standard-library files -> %s", len(files), out)
        with atomic_dir(out, overwrite=True) as tmp:
            tok = train_sentencepiece(read_documents(files), cfg.tokenizer_vocab_size,
                                      tmp / "tokenizer.model", "data.tokenizer_vocab_size")
            stats = write_indexed_dataset(read_documents(files), tok, tmp / "corpus",
                                          total=len(files))
            atomic_write_json(tmp / "done.json", {**stats, "files": len(files)})
    if dist.is_initialized():
        dist.barrier()
    return str(out / "corpus"), str(out / "tokenizer.model")


def embedded_tokenizer(cfg: DataConfig) -> SentencePieceTokenizer:
    """The embedded corpus' tokenizer (building the corpus if needed)."""
    return SentencePieceTokenizer(prepare_embedded(cfg)[1])

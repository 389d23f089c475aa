"""Data verbs: ``data`` (an indexed dataset) and ``instruct-data`` (the embedded
instruction set)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from nemo_minitron.config import ConfigError


def cmd_data(args: argparse.Namespace) -> int:
    from nemo_minitron.data.corpus import read_documents, stdlib_files
    from nemo_minitron.data.indexed import iter_input_documents, write_indexed_dataset
    from nemo_minitron.data.tokenizer import load_tokenizer, train_sentencepiece

    if args.inputs:
        def docs() -> Iterator[str]:
            return iter_input_documents(args.inputs, args.json_key)

        total = None
    else:
        files = stdlib_files(args.corpus_max_bytes)

        def docs() -> Iterator[str]:
            return read_documents(files)

        total = len(files)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    elif args.train_tokenizer is not None:
        tok = train_sentencepiece(docs(), args.train_tokenizer,
                                  Path(args.output_prefix).parent / "tokenizer.model",
                                  "--train-tokenizer")
    else:
        raise ConfigError("give --tokenizer (a .model file or HF directory) or "
                          "--train-tokenizer VOCAB_SIZE")
    stats = write_indexed_dataset(docs(), tok, args.output_prefix, total=total)
    print(json.dumps(stats))
    return 0


def cmd_instruct_data(args: argparse.Namespace) -> int:
    import shutil

    from nemo_minitron.config import DataConfig
    from nemo_minitron.data.embedded_instruct import prepare_embedded_instruct
    from nemo_minitron.utils.fs import atomic_dir

    cfg = DataConfig(cache_dir=args.cache_dir, corpus_max_bytes=args.corpus_max_bytes,
                     seed=args.seed)
    train, valid = prepare_embedded_instruct(cfg, max_chars=args.max_chars,
                                             valid_fraction=args.valid_fraction)
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        shutil.copyfile(train, tmp / "train.jsonl")
        shutil.copyfile(valid, tmp / "valid.jsonl")
    print(json.dumps({"train": str(out / "train.jsonl"), "valid": str(out / "valid.jsonl")}))
    return 0


def add_data(sub: argparse._SubParsersAction) -> None:
    """The ``data`` verb's arguments."""
    p = sub.add_parser("data", help="tokenize JSONL/text files into a Megatron indexed dataset",
                       description="Tokenize documents into <output-prefix>.bin/.idx. Inputs: "
                                   ".jsonl (one document per line) or text files (one document "
                                   "per file); none: the embedded stdlib corpus.")
    p.add_argument("inputs", nargs="*", help=".jsonl or text files")
    p.add_argument("--output-prefix", required=True, help="output path without .bin/.idx")
    p.add_argument("--tokenizer", help="sentencepiece .model file or Hugging Face directory")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                   help="train a sentencepiece BPE model on the inputs instead")
    p.add_argument("--json-key", default="text", help="JSONL field holding the text")
    p.add_argument("--corpus-max-bytes", type=int, default=8_000_000,
                   help="size of the embedded corpus when no inputs are given")
    p.set_defaults(func=cmd_data)


def add_instruct_data(sub: argparse._SubParsersAction) -> None:
    """The ``instruct-data`` verb's arguments."""
    p = sub.add_parser("instruct-data", help="write the embedded instruction set (JSONL)",
                       description="The standard library's documented functions as Alpaca "
                                   "examples ('Write the Python function name(signature) that "
                                   "does: <docstring>', the real source as the answer), split "
                                   "into train.jsonl and valid.jsonl by whole source files. "
                                   "Built once in the cache, copied to --out.")
    p.add_argument("--out", required=True, help="new directory for train.jsonl, valid.jsonl")
    p.add_argument("--cache-dir", default="~/.cache/nemo_minitron", help="build cache")
    p.add_argument("--corpus-max-bytes", type=int, default=8_000_000,
                   help="standard-library source read (sorted by path)")
    p.add_argument("--max-chars", type=int, default=2000,
                   help="longest instruction + answer kept, in characters")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="share of the examples held out (whole files)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the held-out split")
    p.set_defaults(func=cmd_instruct_data)


VERBS = {"data": add_data, "instruct-data": add_instruct_data}
"""This module's verbs: name -> the function adding its arguments (``cli.build_parser``)."""

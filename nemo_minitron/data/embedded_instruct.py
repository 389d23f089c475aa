"""The embedded instruction set: the standard library's documented functions as instructions.

Every public top-level function with a docstring in the embedded corpus' files becomes an
Alpaca example: ``"Write the Python function name(signature) that does: <docstring>"`` with
the function's own source (decorators and docstring included) as the reference answer, a real,
human-written answer that can be checked: it parses and defines that name. Examples keep
``file`` (relative to the standard library) and ``name`` beside the Alpaca fields.

Built once per interpreter version and size, cached like the embedded corpus; rank 0 builds,
the other ranks wait. The held-out split takes whole files, so no source file is shared
between ``train.jsonl`` and ``valid.jsonl``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from nemo_minitron.config import ConfigError, DataConfig
from nemo_minitron.data.corpus import stdlib_files, stdlib_root
from nemo_minitron.data.instruct import parse_example, split_examples, write_jsonl
from nemo_minitron.utils.fs import atomic_dir, atomic_write_json
from nemo_minitron.utils.logging import get_logger

log = get_logger("data.embedded_instruct")


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """``name(args) -> returns`` as written in the source."""
    sig = f"{node.name}({ast.unparse(node.args)})"
    return f"{sig} -> {ast.unparse(node.returns)}" if node.returns is not None else sig


def defines(source: str, name: str) -> bool:
    """``source`` parses as Python and defines a top-level function ``name``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name
               for n in tree.body)


def function_examples(path: Path, rel: str, max_chars: int) -> Iterator[dict[str, Any]]:
    """The documented public top-level functions of one file, as Alpaca records."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return
    lines = text.splitlines(keepends=True)
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) \
                or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or not doc.strip():
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        source = "".join(lines[first - 1:node.end_lineno]).rstrip() + "\n"
        kind = "async function" if isinstance(node, ast.AsyncFunctionDef) else "function"
        instruction = f"Write the Python {kind} {signature(node)} that does: {doc.strip()}"
        if len(instruction) + len(source) > max_chars or not defines(source, node.name):
            continue
        yield {"instruction": instruction, "output": source, "file": rel, "name": node.name}


def instruct_dir(cfg: DataConfig, max_chars: int, valid_fraction: float) -> Path:
    """Cache directory for this interpreter, corpus size, length cap, split and seed."""
    v = sys.version_info
    key = (f"instruct-py{v.major}.{v.minor}.{v.micro}-{cfg.corpus_max_bytes}-c{max_chars}"
           f"-v{valid_fraction}-s{cfg.seed}")
    return Path(cfg.cache_dir).expanduser() / key


def prepare_embedded_instruct(cfg: DataConfig, *, max_chars: int = 2000,
                              valid_fraction: float = 0.1) -> tuple[str, str]:
    """``(train.jsonl, valid.jsonl)`` of the embedded instruction set, building it once."""
    if max_chars <= 0:
        raise ConfigError(f"max_chars={max_chars} must be a positive number")
    out = instruct_dir(cfg, max_chars, valid_fraction)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not (out / "done.json").exists():
        root = stdlib_root()
        files = stdlib_files(cfg.corpus_max_bytes)
        examples = []
        for p in files:
            rel = p.relative_to(root).as_posix()
            for rec in function_examples(p, rel, max_chars):
                examples.append(parse_example(rec, f"{rel}:{rec['name']}"))
        if len(examples) < 2:
            raise ConfigError(f"data.corpus_max_bytes={cfg.corpus_max_bytes} yields "
                              f"{len(examples)} documented functions; need at least 2")
        train, valid = split_examples(examples, valid_fraction, cfg.seed,
                                      group=lambda e: e.source["file"])
        log.info("embedded instruction set: %d functions from %d files -> %d train, %d valid "
                 "(%s)", len(examples), len(files), len(train), len(valid), out)
        with atomic_dir(out, overwrite=True) as tmp:
            write_jsonl(tmp / "train.jsonl", train)
            write_jsonl(tmp / "valid.jsonl", valid)
            atomic_write_json(tmp / "done.json", {
                "train": len(train), "valid": len(valid), "files": len(files),
                "valid_files": len({e.source["file"] for e in valid})})
    if dist.is_initialized():
        dist.barrier()
    return str(out / "train.jsonl"), str(out / "valid.jsonl")

"""The embedded default corpus: the source of the running interpreter's standard library.

Every machine that runs us has it, so the demo and the tests need no download. Files are
taken in sorted path order (test suites and site-packages excluded) up to a byte budget, so
the corpus is deterministic for a given Python version.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__",
                  "lib2to3", "turtledemo", "ensurepip", "pydoc_data"}


def stdlib_root() -> Path:
    """Directory of the standard library's pure-Python sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_bytes: int) -> list[Path]:
    """Standard-library ``.py`` files in sorted relative-path order, up to ``max_bytes``."""
    root = stdlib_root()
    files = sorted(
        (p for p in root.rglob("*.py")
         if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    out, total = [], 0
    for p in files:
        size = p.stat().st_size
        if size == 0:
            continue
        if total + size > max_bytes:
            break
        out.append(p)
        total += size
    if not out:
        raise RuntimeError(f"no standard-library sources found under {root}")
    return out


def read_documents(paths: list[Path]) -> Iterator[str]:
    """One document per file (undecodable bytes replaced)."""
    for p in paths:
        yield p.read_text(encoding="utf-8", errors="replace")

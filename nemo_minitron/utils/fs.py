"""Atomic file-system writes: build aside, then rename, so nothing half-written is left."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def replace_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str],
                overwrite: bool = False) -> None:
    """Move the finished directory ``tmp`` to ``final``; an existing ``final`` is replaced
    (only with ``overwrite``) by renaming it aside first, so ``final`` is always either the old
    or the new directory, never a mix."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final} already exists")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that is renamed to ``final`` on success.

    On an exception the temporary directory is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the result from other users
    try:
        yield tmp
        replace_dir(tmp, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open()`` gives a new file under the current umask."""
    return 0o666 & ~_umask()


def readable_as_umask(path: str | os.PathLike[str]) -> None:
    """Give the file ``path`` the mode a plain ``open()`` would have: writers that build a file
    aside and rename it (``mkstemp``, safetensors' ``save_file``) leave it 0600, which other
    users of a shared cluster cannot read."""
    os.chmod(path, file_mode())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp's 0600, not the umask's
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """``atomic_write_text`` of indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str], hint: str = "") -> Any:
    """A JSON file written by us (``atomic_write_json``, so never torn by a crash of ours): one
    damaged outside a run is a one-line ``ConfigError`` naming it, followed by ``hint``."""
    from nemo_minitron.config import ConfigError

    try:
        return json.loads(Path(path).read_bytes())
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for non-UTF-8 bytes
        raise ConfigError(f"{path} is torn or not JSON ({e}){hint}") from None


def repair_jsonl(path: str | os.PathLike[str]) -> bool:
    """Cut a torn last line (a crash mid-write leaves it without its newline) from an
    append-only JSONL file, so that later appends and reads are whole lines; a last line that
    is complete JSON only gets its newline. Returns whether the file was changed."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return False
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
            f.write(b"\n")
        except ValueError:
            f.truncate(start)
    return True


def read_jsonl_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSONL file written by us (e.g. ``metrics.jsonl``), repairing a torn
    last line first."""
    from nemo_minitron.config import ConfigError

    repair_jsonl(path)
    records = []
    for i, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise ConfigError(f"{path}:{i} is not a JSON line") from None
    return records

"""Checksums of a checkpoint's files: ``manifest.json`` written at save, checked on load.

A flipped byte or a truncated file otherwise loads silently (a weight changes) or fails deep in
torch with a raw traceback. The manifest holds every file's size and BLAKE2b digest; checking a
part of a checkpoint (``weights/``, ``optimizer/``, ...) rereads and hashes its files.
Checkpoints written before manifests existed load with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """BLAKE2b (16-byte digest) of a file, streamed."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def manifest_entries(root: str | os.PathLike[str]) -> dict[str, dict[str, int | str]]:
    """``{relative path: {"size", "blake2b"}}`` of every file under ``root``."""
    root = Path(root)
    return {rel: {"size": (root / rel).stat().st_size, "blake2b": file_digest(root / rel)}
            for rel in _files(root)}


def write_manifest(root: str | os.PathLike[str]) -> dict[str, dict[str, int | str]]:
    """Write ``root/manifest.json`` for every file under ``root`` (the last step of a save,
    before the directory is renamed into place); returns its entries."""
    from nemo_minitron.utils.fs import atomic_write_json

    entries = manifest_entries(root)
    atomic_write_json(Path(root) / MANIFEST, {"algorithm": "blake2b-128", "files": entries})
    return entries


def load_manifest(root: Path) -> dict[str, dict[str, int | str]] | None:
    """The manifest's entries, ``None`` without one; a damaged manifest is an error string."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        files = doc["files"]
        assert isinstance(files, dict)
        return files
    except Exception:
        raise ValueError(f"{path} is damaged") from None


def check_files(root: str | os.PathLike[str], parts: Iterable[str],
                share: tuple[int, int] = (0, 1)) -> str | None:
    """The first mismatch between ``root``'s files under ``parts`` (file or directory names)
    and its manifest, as a message; ``None`` if they match. ``share=(i, n)`` checks every n-th
    file from the i-th (ranks split the reading). Raises ``FileNotFoundError`` without a
    manifest."""
    root = Path(root)
    try:
        files = load_manifest(root)
    except ValueError as e:
        return str(e)
    if files is None:
        raise FileNotFoundError(root / MANIFEST)
    parts = tuple(parts)
    wanted = sorted(rel for rel in files if rel.split(os.sep, 1)[0] in parts)
    for rel in wanted[share[0]::share[1]]:
        path, want = root / rel, files[rel]
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{path} has {size} bytes, {want.get('size')} when saved"
        if file_digest(path) != want.get("blake2b"):
            return f"{path} does not match its checksum"
    return None

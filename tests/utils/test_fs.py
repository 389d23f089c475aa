"""Files we publish have the modes a plain ``open()`` gives under the umask, although they are
written aside and renamed (``mkstemp`` would leave them 0600, unreadable by the other users of a
shared cluster). The reference is the operating system: a file created with ``open()``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nemo_minitron.utils.fs import atomic_dir, atomic_write_json, atomic_write_text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _open_mode(directory: Path) -> int:
    """The mode of a file made by ``open()`` in ``directory`` under the current umask."""
    ref = directory / "made-by-open"
    ref.write_text("x")
    try:
        return _mode(ref)
    finally:
        ref.unlink()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        want = _open_mode(tmp_path)
        atomic_write_text(tmp_path / "a.txt", "hello\n")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "c.txt").write_text("c")
        dir_want = 0o777 & ~umask
    finally:
        os.umask(old)
    assert want == 0o666 & ~umask  # the reference itself
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "b.json") == want
    assert _mode(tmp_path / "d" / "c.txt") == want and _mode(tmp_path / "d") == dir_want


def test_checkpoint_files_are_readable_as_the_umask_says(teacher, tmp_path):
    """Every file of a saved checkpoint (config, manifest, train state, tokenizer, Megatron's
    weights) has the mode ``open()`` gives (the teacher was saved under this umask)."""
    want = _open_mode(tmp_path)
    files = [p for p in Path(teacher).rglob("*") if p.is_file()]
    assert {"model_config.yaml", "manifest.json", "train_state.json"} <= {p.name for p in files}
    wrong = {str(p.relative_to(teacher)): oct(_mode(p)) for p in files if _mode(p) != want}
    assert not wrong, f"not {oct(want)}: {wrong}"

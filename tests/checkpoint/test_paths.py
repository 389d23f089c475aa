"""Step directories and atomic directory replacement (no model needed)."""

from __future__ import annotations

import pytest

from nemo_minitron.checkpoint.io import MODEL_CONFIG, latest_checkpoint, step_dir
from nemo_minitron.utils.fs import atomic_dir, replace_dir


def test_step_dir_is_what_latest_checkpoint_finds(tmp_path):
    assert step_dir(tmp_path, 42) == tmp_path / "checkpoints" / "step_0000042"
    for step in (9, 10, 100):  # zero padding keeps the lexical order numeric
        d = step_dir(tmp_path, step)
        (d / "weights").mkdir(parents=True)
        (d / MODEL_CONFIG).write_text("{}")
    (step_dir(tmp_path, 200) / "weights").mkdir(parents=True)  # incomplete: no model config
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 100)


def test_replace_dir(tmp_path):
    final, new = tmp_path / "out", tmp_path / "new"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    with pytest.raises(FileExistsError):
        replace_dir(new, final)
    assert (final / "old.txt").is_file() and new.is_dir()
    replace_dir(new, final, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in final.iterdir()] == ["new.txt"]


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "x") as tmp:
        (tmp / "f").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

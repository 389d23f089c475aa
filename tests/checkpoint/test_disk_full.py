"""A full disk or a read-only output is a one-line error naming the path; the partial
checkpoint is removed and the previous one stays intact (verified against its manifest)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dist import spawn
from tests.helpers.train import pretrain_job


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]),
                          "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _one_line(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in errors[0], errors[0]


def test_disk_full_during_a_periodic_save(tmp_path, tiny_overrides, capsys):
    """4 MB holds one checkpoint of the tiny model (2.6 MB with its optimizer), not two."""
    from nemo_minitron.checkpoint.io import verify_checkpoint
    from nemo_minitron.cli import main

    with tmpfs(tmp_path / "small", "4m") as mnt:
        out = mnt / "run"
        capsys.readouterr()
        rc = main(["pretrain", *tiny_overrides, "train.train_iters=3", "train.eval_interval=0",
                   "train.save_interval=1", "--out", str(out)])
        assert rc == 2
        _one_line(capsys, f"no space left on the device holding {out / 'checkpoints'}")
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert names == ["step_0000001"], names
        verify_checkpoint(out / "checkpoints" / "step_0000001")
        assert shutil.disk_usage(mnt).free > 1 << 20  # the partial copy's space is back


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_overrides) -> Path:
    out = tmp_path_factory.mktemp("src") / "run"
    spawn(pretrain_job, 1, str(out), tiny_overrides + ["train.train_iters=1",
                                                       "train.eval_interval=0"])
    return out / "checkpoints" / "step_0000001"


PRUNE = ["target.ffn_hidden_size=64", "calib.num_samples=8", "calib.micro_batch_size=4",
         "calib.eval_samples=8"]


@pytest.mark.parametrize("size, options, needle", [
    ("200k", (), "no space left on the device holding"),
    ("1m", ("ro",), "read-only file system"),
])
def test_prune_into_a_full_or_read_only_disk_leaves_nothing(tmp_path, source, tiny_overrides,
                                                            capsys, size, options, needle):
    from nemo_minitron.cli import main

    data = [o for o in tiny_overrides if o.startswith("data.")]
    with tmpfs(tmp_path / "small", size, *options) as mnt:
        capsys.readouterr()
        assert main(["prune", str(source), str(mnt / "pruned"), *data, *PRUNE]) == 2
        _one_line(capsys, needle, str(mnt))
        assert list(mnt.iterdir()) == []


def test_pretrain_into_a_read_only_disk(tmp_path, tiny_overrides, capsys):
    from nemo_minitron.cli import main

    with tmpfs(tmp_path / "ro", "1m", "ro") as mnt:
        capsys.readouterr()
        assert main(["pretrain", *tiny_overrides, "train.train_iters=1",
                     "train.eval_interval=0", "--out", str(mnt / "run")]) == 2
        _one_line(capsys, f"cannot write {mnt / 'run'}: read-only file system")
        assert list(mnt.iterdir()) == []

"""Corruption is caught: a flipped byte or a truncated file in any file of a checkpoint fails
its checksum; resume falls back to the newest intact checkpoint (same losses as an
uninterrupted run); eval of a corrupt checkpoint is a one-line error; a checkpoint from before
manifests loads with a warning."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.dist import spawn
from tests.helpers.train import _train_losses, pretrain_job

FILES = ["weights/__0_0.distcp", "weights/.metadata", "weights/common.pt",
         "weights/metadata.json", "optimizer/__0_1.distcp", "optimizer/.metadata",
         "train_state.json", "rng/rank_00000.pt", "model_config.yaml",
         "tokenizer/tokenizer.model"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_overrides) -> tuple[Path, list[str]]:
    """Two steps saved after each step."""
    out = tmp_path_factory.mktemp("manifest") / "run"
    args = tiny_overrides + ["train.train_iters=3", "train.eval_interval=0",
                             "train.save_interval=1", "train.exit_interval=2"]
    spawn(pretrain_job, 1, str(out), args)
    return out, args


def flip(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_with_its_digest(run):
    ck = run[0] / "checkpoints" / "step_0000002"
    files = json.loads((ck / "manifest.json").read_text())["files"]
    on_disk = sorted(str(p.relative_to(ck)) for p in ck.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert sorted(files) == on_disk
    for rel in FILES:  # reference: hashlib on the whole file at once
        assert files[rel]["blake2b"] == hashlib.blake2b((ck / rel).read_bytes(),
                                                        digest_size=16).hexdigest()


@pytest.mark.parametrize("rel", FILES)
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_any_damaged_file_fails_verification(tmp_path, run, rel, damage):
    from nemo_minitron.checkpoint.io import verify_checkpoint
    from nemo_minitron.config import ConfigError

    ck = shutil.copytree(run[0] / "checkpoints" / "step_0000002", tmp_path / "ck")
    verify_checkpoint(ck)
    if damage == "flip":
        flip(ck / rel)
    else:
        data = (ck / rel).read_bytes()
        (ck / rel).write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=f"is corrupt: {ck / rel}"):
        verify_checkpoint(ck)


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, run, tiny_overrides):
    out, args = run
    cut = shutil.copytree(out, tmp_path / "cut")
    flip(cut / "checkpoints" / "step_0000002" / "weights" / "__0_0.distcp")
    spawn(pretrain_job, 1, str(tmp_path / "full"), [a for a in args if "exit_interval" not in a])
    log = tmp_path / "log.txt"
    spawn(_resume_logging, 1, str(cut), args, str(log))
    text = log.read_text()
    assert f"skipping {cut / 'checkpoints' / 'step_0000002'}" in text
    assert f"resumed from {cut / 'checkpoints' / 'step_0000001'}" in text
    # Choosing the checkpoint verified it whole; loading it hashed nothing again.
    step1 = cut / "checkpoints" / "step_0000001"
    hashed = json.loads((tmp_path / "hashed.json").read_text())
    listed = json.loads((step1 / "manifest.json").read_text())["files"]
    assert {str(step1 / rel): 1 for rel in listed} == {
        f: n for f, n in hashed.items() if f.startswith(str(step1) + "/")}
    full = _train_losses(tmp_path / "full")
    rows = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    last = {r["step"]: r["lm loss"] for r in rows if r["kind"] == "train"}  # the rerun wins
    assert last == full


def _resume_logging(out: str, args: list[str], log_file: str) -> None:
    """Resume with the log in ``log_file`` and, in ``hashed.json`` beside it, how often each
    file was hashed."""
    import collections
    import logging

    from nemo_minitron.checkpoint import manifest
    from nemo_minitron.utils.logging import setup_logging

    setup_logging()
    handler = logging.FileHandler(log_file)
    logging.getLogger("nemo_minitron").addHandler(handler)
    hashed: collections.Counter[str] = collections.Counter()
    digest = manifest.file_digest

    def counted(path, *a, **kw):
        hashed[str(path)] += 1
        return digest(path, *a, **kw)

    manifest.file_digest = counted
    pretrain_job(out, [a for a in args if "exit_interval" not in a])
    (Path(log_file).parent / "hashed.json").write_text(json.dumps(hashed))


def test_eval_of_a_corrupt_checkpoint_is_one_line(tmp_path, run, embedded_paths, capsys):
    from nemo_minitron.cli import main

    ck = shutil.copytree(run[0] / "checkpoints" / "step_0000002", tmp_path / "ck")
    flip(ck / "weights" / "__0_1.distcp")
    capsys.readouterr()
    assert main(["eval", str(ck), "--data", embedded_paths[0], "--max-windows", "1"]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"is corrupt: {ck / 'weights' / '__0_1.distcp'} does not match its checksum" \
        in lines[0]


def test_checkpoint_without_manifest_loads_with_a_warning(tmp_path, run, embedded_paths,
                                                          capsys):
    from nemo_minitron.cli import main

    ck = shutil.copytree(run[0] / "checkpoints" / "step_0000002", tmp_path / "old")
    (ck / "manifest.json").unlink()
    capsys.readouterr()
    assert main(["eval", str(ck), "--data", embedded_paths[0], "--max-windows", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("has no manifest.json") == 1, err

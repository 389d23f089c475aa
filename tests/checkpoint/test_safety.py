"""A crafted checkpoint runs no code: its pickled ``.metadata`` (or a pickled byte object in
its weights) would create a file when unpickled; loading it through every verb that reads a
checkpoint creates nothing and fails with one line naming the class."""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import pytest

from tests.dist import spawn
from tests.helpers.train import pretrain_job


class Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_overrides) -> Path:
    out = tmp_path_factory.mktemp("good") / "run"
    spawn(pretrain_job, 1, str(out), tiny_overrides + ["train.train_iters=1",
                                                       "train.eval_interval=0"])
    return out / "checkpoints" / "step_0000001"


def _reseal(ckpt: Path) -> None:
    """Rewrite the manifest as an attacker would, so that only the unpickling guards stand."""
    from nemo_minitron.checkpoint.manifest import MANIFEST, manifest_entries

    (ckpt / MANIFEST).write_text(json.dumps({"files": manifest_entries(ckpt)}))


def craft_metadata(src: Path, dst: Path, sub: str, marker: Path) -> Path:
    """``src`` copied with ``<sub>/.metadata`` replaced by the payload."""
    shutil.copytree(src, dst)
    (dst / sub / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    _reseal(dst)
    return dst


def craft_byte_object(src: Path, dst: Path, marker: Path) -> Path:
    """``src`` copied with a legitimate ``.metadata`` whose first byte object (a layer's
    ``_extra_state``) points at the payload: torch would ``torch.load(weights_only=False)`` it."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    shutil.copytree(src, dst)
    meta_file = dst / "weights" / ".metadata"
    meta = pickle.loads(meta_file.read_bytes())  # our own checkpoint: trusted here
    key = next(k for k, v in meta.state_dict_metadata.items()
               if isinstance(v, BytesStorageMetadata))
    buf = io.BytesIO()
    pickle.dump(Payload(marker), buf)
    (dst / "weights" / "__9_0.distcp").write_bytes(buf.getvalue())
    info = meta.storage_data[MetadataIndex(key)]
    info.relative_path, info.offset, info.length = "__9_0.distcp", 0, len(buf.getvalue())
    meta_file.write_bytes(pickle.dumps(meta))
    _reseal(dst)
    return dst


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def _verbs(bad: Path, good: Path, tmp: Path, tiny: list[str], prefix: str) -> dict[str, list]:
    train = tiny + ["train.train_iters=1", "train.eval_interval=0"]
    data = [o for o in tiny if o.startswith("data.")]
    calib = ["calib.num_samples=8", "calib.micro_batch_size=4", "calib.eval_samples=8"]
    resume = tmp / "resume"
    (resume / "checkpoints").mkdir(parents=True)
    shutil.copytree(bad, resume / "checkpoints" / "step_0000001")
    return {
        "eval": ["eval", str(bad), "--data", prefix, "--max-windows", "1"],
        "generate": ["generate", str(bad), "--prompt", "def", "--max-new-tokens", "1"],
        "prune": ["prune", str(bad), str(tmp / "pruned"), *data, *calib, "target.num_layers=1"],
        "distill-teacher": ["distill", "--teacher", str(bad), "--student", str(good),
                            *train, "--out", str(tmp / "kd1")],
        "distill-student": ["distill", "--teacher", str(good), "--student", str(bad),
                            *train, "--out", str(tmp / "kd2")],
        "finetune": ["finetune", str(bad), *train, "--out", str(tmp / "ft")],
        "export-hf": ["export-hf", str(bad), str(tmp / "hf")],
        "bench": ["bench", str(bad), "--batch-size", "1", "--seq-length", "8",
                  "--decode-tokens", "1", "--repeats", "1"],
        "lm-eval": ["lm-eval", str(bad), "--tasks", "lambada_openai", "--limit", "1"],
        "search": ["search", str(bad), str(tmp / "search"), *data, *calib,
                   "search.target_params=100000", "search.tolerance=0.5"],
        "resume": ["pretrain", *train, "--out", str(resume)],
    }


@pytest.mark.parametrize("where", ["weights", "optimizer", "byte-object"])
def test_crafted_checkpoint_runs_no_code_in_any_verb(tmp_path, good, tiny_overrides,
                                                     embedded_paths, capsys, where):
    from nemo_minitron.cli import main

    marker = tmp_path / "pwned"
    if where == "byte-object":
        bad = craft_byte_object(good, tmp_path / "bad", marker)
        needle = "not plain data"
    else:
        bad = craft_metadata(good, tmp_path / "bad", where, marker)
        needle = "io.open"
    # Sanity: the crafted file does run code when unpickled plainly (then undo it).
    if where != "byte-object":
        pickle.loads((bad / where / ".metadata").read_bytes()).close()
        assert marker.exists()
        marker.unlink()
    verbs = _verbs(bad, good, tmp_path, tiny_overrides, embedded_paths[0])
    if where == "optimizer":  # only resume reads the optimizer state
        verbs = {"resume": verbs["resume"]}
    capsys.readouterr()
    for name, argv in verbs.items():
        before = {p for p in tmp_path.rglob("*")}
        assert main(argv) == 2, name
        _one_line(capsys, needle, "refusing to unpickle")
        assert not marker.exists(), name
        assert {p for p in tmp_path.rglob("*")} == before, name  # nothing written


def test_real_checkpoint_verifies(good):
    from nemo_minitron.checkpoint.safety import verify_dist_checkpoint

    verify_dist_checkpoint(good / "weights")
    verify_dist_checkpoint(good / "optimizer")

"""A torn last line of ``metrics.jsonl`` (a crash mid-write) is cut by readers and by the next
run, instead of failing every later run of the same command."""

from __future__ import annotations

import json

import pytest

from nemo_minitron.utils.fs import read_jsonl_records, repair_jsonl
from tests.dist import spawn
from tests.helpers.train import pretrain_job

WHOLE = [{"kind": "train", "step": 1, "lm loss": 7.0}, {"kind": "valid", "step": 1, "lm loss": 6.5}]


def _write(path, tail: bytes) -> None:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in WHOLE) + tail)


@pytest.mark.parametrize("tail, kept", [
    (b'{"kind": "train", "st', WHOLE),                   # torn: cut
    (b'{"kind": "speed", "step": 2}', WHOLE + [{"kind": "speed", "step": 2}]),  # newline lost
    (b"", WHOLE),                                        # intact
])
def test_read_jsonl_repairs_a_torn_tail(tmp_path, tail, kept):
    f = tmp_path / "metrics.jsonl"
    _write(f, tail)
    assert read_jsonl_records(f) == kept
    assert f.read_bytes().endswith(b"\n")
    assert [json.loads(x) for x in f.read_text().splitlines()] == kept  # plain reader agrees
    assert repair_jsonl(f) is False


def test_plot_of_a_torn_file(tmp_path):
    from nemo_minitron.utils.plots import plot_loss_curves

    f = tmp_path / "metrics.jsonl"
    _write(f, b'{"kind": "tra')
    assert plot_loss_curves(f, tmp_path / "loss.png").stat().st_size > 0


def test_rerun_after_a_torn_line_finishes(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    args = tiny_overrides + ["train.train_iters=2", "train.eval_interval=0",
                             "train.exit_interval=1"]
    spawn(pretrain_job, 1, str(out), args)
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "train", "step": 2, "lm lo')
    spawn(pretrain_job, 1, str(out), args)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert (out / "loss.png").stat().st_size > 0

"""A stop signal sent to the whole process group (Ctrl-C, ``timeout``, torchrun's shutdown,
SLURM) right after a periodic save: the run saves, exits 75 (not finished, not failed: a job
script requeues on it, a pipeline does not go on) and resumes to the losses of an
uninterrupted run (reference: the same run without a signal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist import _free_port

ITERS = 8


def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {}
    for r in rows:
        if r["kind"] == "train":
            assert r["step"] not in losses, f"step {r['step']} trained twice"
            losses[r["step"]] = r["lm loss"]
    return losses


def _cmd(out: Path, tiny: list[str], nproc: int) -> list[str]:
    head = [sys.executable, "-m", "nemo_minitron"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(_free_port()), "-m", "nemo_minitron"]
    return head + ["pretrain", *tiny, f"train.train_iters={ITERS}", "train.eval_interval=0",
                   "train.save_interval=2", "train.lr_warmup_iters=2", "--out", str(out)]


def _interrupted(out: Path, tiny: list[str], nproc: int, sig: int) -> subprocess.CompletedProcess:
    """Start the run in its own session; signal the whole group once step 2 is saved."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_cmd(out, tiny, nproc), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    first = out / "checkpoints" / "step_0000002"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before its first periodic save was seen"
    os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_overrides) -> dict[int, float]:
    out = tmp_path_factory.mktemp("ref") / "run"
    res = subprocess.run(_cmd(out, tiny_overrides, 1), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    return _train_losses(out)


def _check(out: Path, res: subprocess.CompletedProcess, tiny: list[str], nproc: int,
           reference: dict[int, float]) -> None:
    assert "stopping at step" in res.stderr, res.stderr[-3000:]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert not [n for n in saved if n.endswith((".tmp", ".old"))], saved
    stop = max(_train_losses(out))
    assert 2 <= stop < ITERS and f"step_{stop:07d}" in saved, (stop, saved)
    again = subprocess.run(_cmd(out, tiny, nproc), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{stop:07d}'}" in again.stderr
    got = _train_losses(out)
    assert got.keys() == reference.keys() == set(range(1, ITERS + 1))
    for step in reference:  # bit-exact in one process; DP=2 sums in another order
        assert got[step] == pytest.approx(reference[step], abs=0 if nproc == 1 else 1e-5), step


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT],
                         ids=["SIGTERM", "SIGUSR1", "SIGINT"])
def test_group_signal_in_one_process_saves_and_resumes(tmp_path, tiny_overrides, reference,
                                                        sig):
    out = tmp_path / "run"
    res = _interrupted(out, tiny_overrides, 1, sig)
    assert res.returncode == 75, res.stderr[-3000:]
    assert "stopped: step " in res.stderr and "re-run the same command" in res.stderr
    _check(out, res, tiny_overrides, 1, reference)


@pytest.mark.dist
def test_group_signal_under_torchrun_saves_and_resumes(tmp_path, tiny_overrides, reference):
    """torchrun turns SIGTERM into its own shutdown: it signals each worker's process group
    (workers run in their own sessions), waits for them, then exits non-zero itself by design
    (``SignalException``). The workers must save and finish cleanly."""
    out = tmp_path / "run"
    res = _interrupted(out, tiny_overrides, 2, signal.SIGTERM)
    for sign in ("BrokenPipe", "Worker failure", "CheckpointException", "[rank0]: Traceback",
                 "[rank1]: Traceback"):
        assert sign not in res.stderr, res.stderr[-3000:]
    assert "Received 15 death signal" in res.stderr  # torchrun's own shutdown happened
    _check(out, res, tiny_overrides, 2, reference)

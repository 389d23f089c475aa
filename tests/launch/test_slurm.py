"""The rendered sbatch scripts on a real one-node SLURM cluster: a 2-process (gloo, DP=2) tiny
pretraining job, and the same job preempted (USR1 to the batch shell, as SLURM sends before a
time limit), requeued and resumed, ending with the losses of the uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_minitron.checkpoint.io import is_checkpoint

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[2]
# Enough steps that the preemption signal (sent after 3 logged steps) lands mid-run with steps
# left to resume, even when steps are fast; the test fails loudly if it comes too late.
ITERS = 60


def _launch(out: Path, overrides: list[str], *flags: str) -> str:
    argv = [sys.executable, "-m", "nemo_minitron", "launch", str(ROOT / "recipes/tiny_cpu.yaml"),
            "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1",
            "--out", str(out), *flags, *overrides]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=out.parent,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)[0]["job_id"]


def _job(job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                          text=True).stdout
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def _wait(job: str, timeout: float = 180) -> dict[str, str]:
    end = time.time() + timeout
    held_since = None
    while time.time() < end:
        info = _job(job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return info
        # A requeued job waits ~2 minutes before it is eligible again; release it sooner, but
        # not within the second of the requeue: slurmd refuses a start that falls inside the
        # revocation second of the previous run's credential ("Job credential revoked").
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            held_since = held_since or time.time()
            if time.time() - held_since > 3:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                               check=True)
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish in {timeout} s: {_job(job)}")


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lm loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def overrides(tiny_overrides) -> list[str]:
    return [*tiny_overrides, f"train.train_iters={ITERS}", "train.micro_batch_size=4",
            "train.eval_interval=0", "train.lr_warmup_iters=2"]


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, overrides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slurm") / "straight"
    info = _wait(_launch(out, overrides))
    assert info["JobState"] == "COMPLETED", (out / "logs").glob("*.out")
    return out


def test_two_task_job_trains_and_checkpoints(uninterrupted):
    log = next((uninterrupted / "logs").glob("*.out")).read_text()
    assert "world=2 tp=1 pp=1 dp=2 backend=gloo" in log
    assert is_checkpoint(uninterrupted / "checkpoints" / f"step_{ITERS:07d}")
    assert sorted(_losses(uninterrupted)) == list(range(1, ITERS + 1))


def test_preempted_job_requeues_and_resumes_to_the_same_losses(uninterrupted, overrides,
                                                               tmp_path):
    out = tmp_path / "preempted"
    job = _launch(out, overrides)
    end = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(_losses(out)) < 3:
        assert time.time() < end and _job(job)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    info = _wait(job)
    log = next((out / "logs").glob("*.out")).read_text()
    assert info["JobState"] == "COMPLETED", log
    assert int(info["Restarts"]) == 1, log
    assert "requeueing job" in log and "resumed from" in log
    first = sorted((out / "checkpoints").iterdir())[0].name
    assert first != f"step_{ITERS:07d}", "the signal came too late to test a resume"
    ref, got = _losses(uninterrupted), _losses(out)
    assert sorted(got) == sorted(ref)
    assert got[ITERS] == pytest.approx(ref[ITERS], rel=1e-6, abs=1e-6)
    assert [got[s] for s in sorted(got)] == pytest.approx([ref[s] for s in sorted(ref)],
                                                          rel=1e-5)

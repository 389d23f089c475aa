"""The shipped tiny pipeline (``recipes/tiny_cpu_pipeline.yaml``: pretrain -> prune -> finetune
-> merge) launched as users launch it, on the local one-node SLURM cluster, at tiny scale:
every stage runs; a re-launch of the finished pipeline submits nothing and one of a
half-finished pipeline submits only the missing stages; a second launch while the first one's
jobs are queued submits nothing and names them; a USR1 sent to the first stage's training
step (not the batch shell) requeues that job, the next stage waits for it, and the pipeline
ends with the losses of the uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_minitron.checkpoint.io import is_checkpoint, load_model_config

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "recipes" / "tiny_cpu_pipeline.yaml"
STAGES = ["teacher", "pruned", "healed", "merged"]
TEACHER_ITERS = 100  # enough steps that a signal after 3 logged ones lands mid-run
HEAL_ITERS = 6
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _overrides(tiny: list[str]) -> list[str]:
    """The pipeline's stages at the tiny test scale (``<stage>.<recipe key>=`` overrides)."""
    data = [o for o in tiny if o.startswith("data.")]
    train = ["train.micro_batch_size=4", "train.global_batch_size=8", "train.eval_iters=2",
             "train.log_interval=1", "train.tensorboard=false", "train.lr_warmup_iters=2"]
    model = [o for o in tiny if o.startswith("model.")]
    return ([f"teacher.{o}" for o in [*model, *data, *train, f"train.train_iters={TEACHER_ITERS}",
                                      "train.eval_interval=20", "train.save_interval=10"]]
            + [f"pruned.{o}" for o in [*data, "target.hidden_size=48", "target.ffn_hidden_size=64",
                                       "target.num_layers=2",
                                       "calib.num_samples=8", "calib.micro_batch_size=4",
                                       "calib.eval_samples=8"]]
            + [f"healed.{o}" for o in [*data, *train, f"train.train_iters={HEAL_ITERS}",
                                       "train.seq_length=64", "train.eval_interval=3",
                                       "train.save_interval=3"]])


def _launch(workdir: Path, tiny: list[str]) -> subprocess.CompletedProcess:
    """``nemo-minitron launch PIPELINE workdir=... <overrides>`` in a child process."""
    argv = [sys.executable, "-m", "nemo_minitron", "launch", str(PIPELINE),
            f"workdir={workdir}", *_overrides(tiny)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _job(job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                          text=True).stdout
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def _queued() -> set[str]:
    return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True,
                              text=True).stdout.split())


def _wait(jobs: list[str], timeout: float = 420) -> dict[str, dict[str, str]]:
    """Wait until every job has ended; a requeued job is released after 3 s instead of
    SLURM's ~2 minutes (not within the second of the requeue: slurmd refuses a start inside the
    revocation second of the previous run's credential)."""
    end, held = time.time() + timeout, {}
    while time.time() < end:
        info = {j: _job(j) for j in jobs}
        if all(i.get("JobState") in FINAL for i in info.values()):
            return info
        for j, i in info.items():
            if i.get("JobState") == "PENDING" and i.get("Reason") == "BeginTime":
                held.setdefault(j, time.time())
                if time.time() - held[j] > 3:
                    subprocess.run(["scontrol", "update", f"JobId={j}", "StartTime=now"])
                    held.pop(j)
        time.sleep(0.5)
    subprocess.run(["scancel", *jobs])
    raise AssertionError(f"jobs did not end in {timeout} s: {info}")


def _logs(workdir: Path) -> str:
    return "\n".join(f"---- {p}\n{p.read_text()[-3000:]}"
                     for p in sorted((workdir / "logs").glob("*/*.out")))


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lm loss"] for r in rows if r["kind"] == "train"}


def _outputs(workdir: Path) -> list[Path]:
    return [workdir / "teacher" / "checkpoints" / f"step_{TEACHER_ITERS:07d}",
            workdir / "pruned",
            workdir / "healed" / "checkpoints" / f"step_{HEAL_ITERS:07d}", workdir / "merged"]


@pytest.fixture(scope="module")
def finished(slurm_cluster, tiny_overrides, tmp_path_factory) -> Path:
    """The pipeline run once, uninterrupted."""
    workdir = tmp_path_factory.mktemp("pipeline") / "w"
    r = _launch(workdir, tiny_overrides)
    assert r.returncode == 0, r.stderr
    jobs = json.loads(r.stdout)
    assert [j["stage"] for j in jobs] == STAGES and all(j["submitted"] for j in jobs)
    info = _wait([j["job_id"] for j in jobs])
    assert all(i["JobState"] == "COMPLETED" for i in info.values()), _logs(workdir)
    return workdir


def test_every_stage_runs_on_slurm(finished):
    for out in _outputs(finished):
        assert is_checkpoint(out), (out, _logs(finished))
    # The pruned and merged models have the pruned shape; the launcher's files are beside the
    # stages, not in them (prune and merge refuse an output directory that exists).
    pruned = load_model_config(finished / "pruned")
    assert (pruned.hidden_size, pruned.ffn_hidden_size) == (48, 64)
    assert load_model_config(finished / "merged") == pruned
    for stage in STAGES:
        assert not (finished / stage / "logs").exists()
        assert (finished / "logs" / stage / f"{stage}.sbatch").is_file()
    assert "resumed from" not in _logs(finished)


def test_relaunching_submits_only_what_is_missing(finished, tiny_overrides):
    before = _queued()
    r = _launch(finished, tiny_overrides)
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
    assert r.stderr.count("is complete; not submitted") == len(STAGES)
    assert _queued() <= before

    healed = finished / "healed"
    first = _losses(healed)
    shutil.rmtree(healed)
    shutil.rmtree(finished / "merged")
    r = _launch(finished, tiny_overrides)
    assert r.returncode == 0, r.stderr
    jobs = {j["stage"]: j["job_id"] for j in json.loads(r.stdout)}
    assert list(jobs) == ["healed", "merged"]
    info = _wait(list(jobs.values()))
    assert _job(jobs["merged"]).get("Dependency") in (None, "(null)")  # resolved by now
    assert all(i["JobState"] == "COMPLETED" for i in info.values()), _logs(finished)
    assert all(is_checkpoint(out) for out in _outputs(finished))
    assert _losses(healed) == pytest.approx(first, rel=1e-6, abs=1e-6)


def test_a_signal_to_the_training_step_requeues_and_the_pipeline_waits(finished, tiny_overrides,
                                                                      tmp_path):
    workdir = tmp_path / "w"
    r = _launch(workdir, tiny_overrides)
    assert r.returncode == 0, r.stderr
    jobs = {j["stage"]: j["job_id"] for j in json.loads(r.stdout)}
    ids = list(jobs.values())
    try:
        # USR1 to the job's steps only (what a user's `scancel --signal=USR1 JOB` does).
        teacher = workdir / "teacher"
        end = time.time() + 180
        while not (teacher / "metrics.jsonl").exists() or len(_losses(teacher)) < 3:
            assert time.time() < end and _job(jobs["teacher"])["JobState"] in ("PENDING",
                                                                               "RUNNING")
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", jobs["teacher"]], check=True)

        # A second launch while these jobs are queued or running submits nothing, names them.
        before = _queued()
        again = _launch(workdir, tiny_overrides)
        assert again.returncode == 0, again.stderr
        assert [(j["job_id"], j["submitted"]) for j in json.loads(again.stdout)] \
            == [(j, False) for j in ids]
        for stage, job in jobs.items():
            assert f"stage {stage}: job {job} (" in again.stderr
        assert _queued() <= before  # nothing new (jobs may have ended meanwhile)
        info = _wait(ids)
    finally:
        subprocess.run(["scancel", *ids])
    assert all(i["JobState"] == "COMPLETED" for i in info.values()), _logs(workdir)
    assert int(info[jobs["teacher"]]["Restarts"]) == 1, _logs(workdir)
    log = next((workdir / "logs" / "teacher").glob("*.out")).read_text()
    assert "stopped before its last step" in log and "requeueing job" in log
    assert "resumed from" in log
    stopped_at = min(int(p.name.split("_")[1]) for p in (teacher / "checkpoints").iterdir())
    assert stopped_at < TEACHER_ITERS, "the signal came too late to test a resume"
    # The prune job started only after the teacher's requeued run had ended.
    assert info[jobs["teacher"]]["EndTime"] <= info[jobs["pruned"]]["StartTime"]
    for stage in ("teacher", "healed"):
        ref, got = _losses(finished / stage), _losses(workdir / stage)
        assert sorted(got) == sorted(ref)
        assert [got[s] for s in sorted(got)] == pytest.approx([ref[s] for s in sorted(ref)],
                                                              rel=1e-5)


def test_a_relaunch_replaces_jobs_whose_dependency_failed(slurm_cluster, tiny_overrides,
                                                          tmp_path):
    """Cancel the first stage's job: the stages after it can never start (SLURM keeps them
    pending, DependencyNeverSatisfied). Launching again cancels those and submits the whole
    chain anew instead of naming dead jobs as the holders."""
    workdir = tmp_path / "w"
    r = _launch(workdir, tiny_overrides)
    assert r.returncode == 0, r.stderr
    old = {j["stage"]: j["job_id"] for j in json.loads(r.stdout)}
    new: dict[str, str] = {}
    try:
        subprocess.run(["scancel", old["teacher"]], check=True)
        end = time.time() + 60
        while _job(old["pruned"]).get("Reason") != "DependencyNeverSatisfied":
            assert time.time() < end, _job(old["pruned"])
            time.sleep(0.5)
        r = _launch(workdir, tiny_overrides)
        assert r.returncode == 0, r.stderr
        jobs = json.loads(r.stdout)
        new = {j["stage"]: j["job_id"] for j in jobs}
        assert list(new) == STAGES and all(j["submitted"] for j in jobs)
        assert not set(new.values()) & set(old.values())
        for stage in STAGES[1:]:
            assert _job(old[stage]).get("JobState") in ("CANCELLED", None), _job(old[stage])
    finally:
        subprocess.run(["scancel", *old.values(), *new.values()])

"""The launch verb: dry-run output, injection safety, pipelines and bad input (one-line
errors, nothing written, nothing submitted). Tests marked ``slurm`` use the local cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.helpers.launch import ROOT, _cli, _dry, _fake_checkpoint, _words

EVIL = "x; touch {}"
TINY = str(ROOT / "recipes" / "tiny_cpu.yaml")
CPU2 = ["--gpus-per-node", "0", "--tasks-per-node", "2"]


def test_dry_run_prints_an_inert_script_and_writes_nothing(tmp_path):
    pwned, out = tmp_path / "pwned", tmp_path / "run"
    evil = f"data.path={EVIL.format(pwned)}"
    r = _dry("launch", TINY, "--dry-run", *CPU2, "--out", str(out), evil,
             "train.global_batch_size=16", path="/usr/bin:/bin")  # no SLURM needed
    assert r.returncode == 0, r.stderr
    script = r.stdout
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert "'data.path=x; touch " in script  # shlex.quote's form
    assert _words(script) == [sys.executable, "-m", "nemo_minitron", "pretrain", TINY, evil,
                              "train.global_batch_size=16", "--out", str(out)]
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", f"#SBATCH --output={out}/logs/%x-%j.out"):
        assert line in script.splitlines()
    assert "--gpus-per-node" not in script and "scontrol requeue" in script
    assert not pwned.exists() and not out.exists()


def test_container_flags_reach_srun(tmp_path):
    r = _dry("launch", TINY, "--dry-run", "--nodes", "2", "--gpus-per-node", "4",
             "--container-image", "nvcr.io#nvidia/nemo:25.11", "--container-mounts",
             "/lustre:/lustre", "--partition", "batch", "--time", "01:00:00",
             "--out", str(tmp_path / "r"), "train.global_batch_size=64")
    assert r.returncode == 0, r.stderr
    srun = _words(r.stdout, "srun_args")
    assert "--container-image=nvcr.io#nvidia/nemo:25.11" in srun
    assert "#SBATCH --gpus-per-node=4" in r.stdout and "#SBATCH --partition=batch" in r.stdout
    for line in ("#SBATCH --exclusive", "#SBATCH --mem=0"):  # GPU jobs take whole nodes
        assert line in r.stdout.splitlines()
    # The checkout, the working directory and the stage's directory are mounted at their own
    # paths beside the user's mounts; the container's python runs the checkout's code.
    (mounts,) = [w.split("=", 1)[1] for w in srun if w.startswith("--container-mounts=")]
    assert mounts.split(",") == ["/lustre:/lustre", f"{ROOT}:{ROOT}", f"{tmp_path}:{tmp_path}"]
    assert f"--container-workdir={ROOT}" in srun  # _dry runs in the checkout
    words = _words(r.stdout)
    assert words[:2] == ["bash", "-c"] and words[3:6] == [str(ROOT), "pretrain", TINY]
    boot = subprocess.run(["/bin/bash", "-c", words[2], str(ROOT), "--help"], capture_output=True,
                          text=True, env={"PATH": os.path.dirname(sys.executable),
                                          "PYTHONPATH": "/elsewhere"})
    assert boot.returncode == 0 and "usage: nemo-minitron" in boot.stdout, boot.stderr


def test_container_mounts_are_not_doubled_under_a_user_mount(tmp_path):
    r = _dry("launch", TINY, "--dry-run", "--container-image", "nvcr.io#nvidia/nemo:25.11",
             "--container-mounts", f"/:/,{tmp_path}:/data", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    (mounts,) = [w.split("=", 1)[1] for w in _words(r.stdout, "srun_args")
                 if w.startswith("--container-mounts=")]
    assert mounts == f"/:/,{tmp_path}:/data"  # '/' maps every path to itself already


@pytest.mark.parametrize("args,needle", [
    (["--job-name", "a;b"], "cluster.job_name='a;b' may hold only"),
    (["--gpus-per-node", "0", "--tasks-per-node", "3", "parallel.tensor_model_parallel_size=2"],
     "world size 3 is not divisible by tensor_model_parallel_size"),
    (["--gpus-per-node", "0", "--tasks-per-node", "2"],
     "global_batch_size=8 is not divisible by train.micro_batch_size * data-parallel size = 16"),
    (["--cluster", "local", "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1",
      "train.global_batch_size=16"],
     "runs on one node"),
    (["--gpus-per-node", "1"], "'sbatch' is not on PATH"),
])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, args, needle):
    out = tmp_path / "run"
    r = _dry("launch", TINY, "--out", str(out), *args, path=os.path.dirname(sys.executable))
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not out.exists()


def test_pipeline_dry_run_skips_complete_stages(tmp_path):
    pipe = str(ROOT / "recipes" / "tiny_cpu_pipeline.yaml")
    r = _dry("launch", pipe, "--dry-run", f"workdir={tmp_path}")
    assert r.returncode == 0, r.stderr
    heads = [x for x in r.stdout.splitlines() if x.startswith("# ---- stage")]
    assert [h.split()[3].rstrip(":") for h in heads] == ["teacher", "pruned", "healed", "merged"]
    assert "afterok" not in heads[0] and "<job of teacher>" in heads[1]
    words = _words(r.stdout.split("# ---- stage pruned")[1])
    assert words[3:6] == ["prune", f"{tmp_path}/teacher/checkpoints/step_0000600",
                          f"{tmp_path}/pruned"]
    _fake_checkpoint(tmp_path / "teacher" / "checkpoints" / "step_0000600")
    r = _dry("launch", pipe, "--dry-run", f"workdir={tmp_path}")
    heads = [x for x in r.stdout.splitlines() if x.startswith("# ---- stage")]
    assert len(heads) == 3 and "afterok" not in heads[0] and "afterok" in heads[1]


def _state(job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                          text=True).stdout
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


@pytest.mark.slurm
def test_pipeline_stages_are_chained_by_afterok(slurm_cluster, tmp_path):
    pipe = str(ROOT / "recipes" / "tiny_cpu_pipeline.yaml")
    r = _cli("launch", pipe, f"workdir={tmp_path}", "teacher.train.train_iters=1")
    assert r.returncode == 0, r.stderr
    jobs = [j["job_id"] for j in json.loads(r.stdout)]
    try:
        assert len(jobs) == 4
        assert _state(jobs[1])["Dependency"].startswith(f"afterok:{jobs[0]}")
        assert _state(jobs[2])["Dependency"].startswith(f"afterok:{jobs[1]}")
        assert re.findall(r"afterok:(\d+)", _state(jobs[3])["Dependency"]) == jobs[1:3]
    finally:
        subprocess.run(["scancel", *jobs])


@pytest.mark.slurm
@pytest.mark.parametrize("args,needle", [
    (["--partition", "nope"], "--partition=nope is not a partition of this cluster"),
    (["--container-image", "nvcr.io#nvidia/nemo:25.11"], "needs the pyxis SPANK plugin"),
])
def test_cluster_checks_before_submission(slurm_cluster, tmp_path, args, needle):
    def queued() -> set[str]:
        return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True,
                                  text=True).stdout.split())
    before = queued()
    r = _dry("launch", TINY, "--out", str(tmp_path / "r"), "--gpus-per-node", "0", *args)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert queued() <= before and not (tmp_path / "r").exists()


@pytest.mark.slurm
def test_injected_value_stays_inert_in_a_real_job(slurm_cluster, tmp_path, tiny_overrides):
    pwned = tmp_path / "pwned"
    r = _cli("launch", TINY, "--out", str(tmp_path / "r"), "--gpus-per-node", "0",
             *tiny_overrides, f"data.path={EVIL.format(pwned)}")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)[0]["job_id"]
    end = time.time() + 120
    while _state(job).get("JobState") in ("PENDING", "RUNNING", "COMPLETING"):
        assert time.time() < end
        time.sleep(0.5)
    log = next((tmp_path / "r" / "logs").glob("*.out")).read_text()
    assert _state(job)["JobState"] == "FAILED"
    assert f"data.path='x; touch {pwned}'" in log  # the program got the value as one word
    assert not pwned.exists()

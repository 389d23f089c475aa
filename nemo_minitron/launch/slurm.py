"""Talk to SLURM: checks before submission (one-line ConfigErrors), ``sbatch``, and the
record of which job holds a stage (``<logs>/<job>.jobid``, checked against the scheduler)."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nemo_minitron.config import ConfigError
from nemo_minitron.launch.sbatch import ClusterConfig


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"{argv[0]} failed: {e}") from None
    if done.returncode:
        msg = (done.stderr or done.stdout).strip().splitlines()
        raise ConfigError(f"{' '.join(argv[:2])} failed: {msg[-1] if msg else done.returncode}")
    return done.stdout


def preflight(clusters: list[ClusterConfig]) -> None:
    """Fail before submitting anything: no sbatch, an unknown partition, or a container
    image without the pyxis plugin (srun lacks --container-image)."""
    for tool in ("sbatch", "sinfo", "srun", "scontrol"):
        if shutil.which(tool) is None:
            raise ConfigError(f"--cluster slurm: '{tool}' is not on PATH (no SLURM client here; "
                              "use --dry-run to print the script, or --cluster local)")
    partitions = {p.strip().rstrip("*") for p in _run(["sinfo", "-h", "-o", "%P"]).split()}
    for c in clusters:
        if c.partition and c.partition not in partitions:
            raise ConfigError(f"--partition={c.partition} is not a partition of this cluster "
                              f"(sinfo: {', '.join(sorted(partitions))})")
    if any(c.container_image for c in clusters) \
            and "--container-image" not in _run(["srun", "--help"]):
        raise ConfigError("--container-image needs the pyxis SPANK plugin, and this "
                          "cluster's srun has no --container-image option")


def submit(script: str, path: Path, after: list[str], record: Path) -> str:
    """Write the script to ``path``, submit it and record its id in ``record``; returns the
    job id."""
    from nemo_minitron.utils.fs import atomic_write_text

    atomic_write_text(path, script)
    argv = ["sbatch", "--parsable"]
    if after:
        argv.append("--dependency=afterok:" + ":".join(after))
    job_id = _run([*argv, str(path)]).strip().split(";")[0]
    atomic_write_text(record, job_id + "\n")
    return job_id


ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}
"""Job states in which a job still holds its stage (it runs, or will)."""


def job_state(job_id: str) -> tuple[str, str] | None:
    """``(JobState, Reason)`` of a job the scheduler still knows, else None."""
    done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                          text=True, timeout=60)
    if done.returncode:
        return None  # "Invalid job id specified": purged from the controller's memory
    info = dict(kv.split("=", 1) for kv in done.stdout.split() if "=" in kv)
    return info.get("JobState", ""), info.get("Reason", "")


def record_path(logs: Path, job_name: str) -> Path:
    """Where ``launch`` records the id of the job it submitted for ``job_name``."""
    return logs / f"{job_name}.jobid"


def holder(logs: Path, job_name: str) -> tuple[str, str] | None:
    """``(job id, state)`` of the queued or running job recorded for ``job_name``, else None.
    A recorded job left pending on a dependency that failed can never run: it is cancelled
    (so that the stage is submitted again, after its new dependencies)."""
    path = record_path(logs, job_name)
    if not path.is_file():
        return None
    job_id = path.read_text().strip()
    if not job_id.isdigit():
        return None
    state = job_state(job_id)
    if state is None or state[0] not in ACTIVE:
        return None
    if state[0] == "PENDING" and state[1] == "DependencyNeverSatisfied":
        cancel(job_id)
        return None
    return job_id, state[0]


def cancel(job_id: str) -> None:
    """Cancel a job, best effort (one that ended meanwhile needs no cancelling either)."""
    subprocess.run(["scancel", job_id], capture_output=True, timeout=60)


@contextmanager
def launch_lock(logs: Path) -> Iterator[None]:
    """One ``launch`` of a pipeline at a time (a lock file beside its job records): a second
    launch waits, then finds the first one's jobs recorded."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / ".launch.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

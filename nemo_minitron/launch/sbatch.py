"""Render one stage as an sbatch script (``launcher/templates/sbatch.sh`` with the job body
``launcher/job.sh`` that the plain ``launcher/<stage>.sbatch`` scripts source).

Injection safety: values that land in ``#SBATCH`` lines (read by sbatch, not by the shell, and
a newline would start a new line) must match a strict character set; every word of the srun
command line is ``shlex.quote``-d into a bash array, so a recipe value such as
``x; touch /tmp/pwned`` reaches the program as one inert argument.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from nemo_minitron.config import ConfigError
from nemo_minitron.utils.paths import launcher_dir

_SAFE = re.compile(r"^[A-Za-z0-9_.:,+=@/%-]+$")
_IMAGE = re.compile(r"^[A-Za-z0-9_.:,+=@/%#-]+$")  # pyxis: registry#image:tag (srun args only)


@dataclass(kw_only=True)
class ClusterConfig:
    """Resources of one SLURM job (CLI flags > a stage's ``cluster:`` > the pipeline's)."""

    nodes: int = 1
    """Nodes of the allocation."""
    gpus_per_node: int = 8
    """GPUs per node; 0 runs CPU processes with gloo."""
    tasks_per_node: int | None = None
    """Processes per node; None means one per GPU (one with no GPU)."""
    cpus_per_task: int | None = None
    """CPU cores per process (OMP_NUM_THREADS follows it); None leaves SLURM's default."""
    partition: str | None = None
    """SLURM partition; None uses the cluster's default."""
    account: str | None = None
    """SLURM account."""
    time: str | None = None
    """Time limit (``HH:MM:SS`` or ``D-HH:MM:SS``)."""
    container_image: str | None = None
    """Container image for pyxis/enroot (``srun --container-image``)."""
    container_mounts: str | None = None
    """pyxis mounts, ``SRC:DST[,SRC:DST...]``."""
    job_name: str = "nemo-minitron"
    """Job name (logs are ``<out>/logs/<job_name>-<jobid>.out``)."""
    signal_seconds: int = 300
    """SLURM sends USR1 this many seconds before the time limit (time to save a checkpoint)."""

    def __post_init__(self) -> None:
        for name in ("nodes", "signal_seconds"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"cluster.{name}={getattr(self, name)!r} must be a "
                                  "positive integer")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            raise ConfigError(f"cluster.gpus_per_node={self.gpus_per_node!r} must be >= 0")
        for name in ("tasks_per_node", "cpus_per_task"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"cluster.{name}={v!r} must be a positive integer")
        for name in ("partition", "account", "time", "job_name", "container_image",
                     "container_mounts"):
            v, rule = getattr(self, name), _IMAGE if name.startswith("container") else _SAFE
            if v is not None and not rule.match(str(v)):
                raise ConfigError(f"cluster.{name}={v!r} may hold only letters, digits and "
                                  f"{rule.pattern[11:-3]}")

    @property
    def ntasks_per_node(self) -> int:
        """Processes per node."""
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        """Processes in the job."""
        return self.nodes * self.ntasks_per_node


def job_command(verb: str, argv: list[str], container: bool) -> list[str]:
    """The per-task command: the container's ``python`` or this interpreter."""
    python = "python" if container else sys.executable
    return [python, "-m", "nemo_minitron", verb, *argv]


def render_sbatch(cluster: ClusterConfig, command: list[str], log_dir: str | Path,
                  workdir: str | Path | None = None) -> str:
    """The sbatch script running ``command`` once per task, with preemption-safe requeue."""
    log_dir = Path(log_dir).absolute()
    workdir = Path(workdir or Path.cwd()).absolute()
    for what, path in (("log directory", log_dir), ("working directory", workdir)):
        if not _SAFE.match(str(path)):
            raise ConfigError(f"{what} {str(path)!r} may hold only letters, digits and "
                              "_.:,+=@/%- (it is written into #SBATCH lines)")
    c = cluster
    lines = [f"--job-name={c.job_name}", f"--nodes={c.nodes}",
             f"--ntasks-per-node={c.ntasks_per_node}"]
    if c.gpus_per_node:
        lines.append(f"--gpus-per-node={c.gpus_per_node}")
    if c.cpus_per_task:
        lines.append(f"--cpus-per-task={c.cpus_per_task}")
    for flag, value in (("partition", c.partition), ("account", c.account), ("time", c.time)):
        if value:
            lines.append(f"--{flag}={value}")
    lines += [f"--output={log_dir}/%x-%j.out", f"--chdir={workdir}", "--requeue",
              "--open-mode=append", f"--signal=B:USR1@{c.signal_seconds}"]
    srun = ["--kill-on-bad-exit=1"]
    if c.container_image:
        srun += [f"--container-image={c.container_image}", f"--container-workdir={workdir}"]
        if c.container_mounts:
            srun.append(f"--container-mounts={c.container_mounts}")
    text = (launcher_dir() / "templates" / "sbatch.sh").read_text()
    job = (launcher_dir() / "job.sh").read_text()
    return (text.replace("@@SBATCH@@", "\n".join(f"#SBATCH {x}" for x in lines))
            .replace("@@COMMAND@@", " ".join(shlex.quote(w) for w in command))
            .replace("@@SRUN_ARGS@@", " ".join(shlex.quote(w) for w in srun))
            .replace("@@JOB@@", job))

"""Render one stage as an sbatch script (``launcher/templates/sbatch.sh`` with the job body
``launcher/job.sh`` that the plain ``launcher/<stage>.sbatch`` scripts source).

Injection safety: values that land in ``#SBATCH`` lines (read by sbatch, not by the shell, and
a newline would start a new line) must match a strict character set; every word of the srun
command line is ``shlex.quote``-d into a bash array, so a recipe value such as
``x; touch /tmp/pwned`` reaches the program as one inert argument.

Containers (pyxis): the job runs this checkout's code on the image's Python and libraries
(the NeMo container: CUDA torch, megatron-core, Transformer Engine). The checkout, the job's
working directory and every directory the stage reads or writes are mounted at their own paths
(unless a ``container_mounts`` entry already maps them there), and the checkout goes first on
the container's ``PYTHONPATH``. Launched from an installed package (no checkout), the image must
carry nemo_minitron itself: build it from the ``Dockerfile``.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from nemo_minitron.config import ConfigError
from nemo_minitron.utils.paths import checkout_dir, launcher_dir

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
    """CPU cores per process (OMP_NUM_THREADS follows it); None: the node's cores divided
    among its processes (``launcher/job.sh``)."""
    exclusive: bool | None = None
    """Whole nodes (``--exclusive``); None: exclusive when the job uses GPUs."""
    mem: str | None = None
    """Memory per node (``--mem``, e.g. ``64G``); None: all of it (``--mem=0``) on exclusive
    nodes, else the cluster's default."""
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
        if self.exclusive is not None and not isinstance(self.exclusive, bool):
            raise ConfigError(f"cluster.exclusive={self.exclusive!r} must be true or false")
        if self.mem is not None and not re.match(r"^[0-9]+[KMGT]?$", str(self.mem)):
            raise ConfigError(f"cluster.mem={self.mem!r} must be a size such as 64G or 0 "
                              "(all of the node's memory)")
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

    @property
    def whole_nodes(self) -> bool:
        """Whether the job asks for its nodes exclusively."""
        return self.exclusive if self.exclusive is not None else self.gpus_per_node > 0


# In a container: the checkout ($0) first on the image's PYTHONPATH, then the verb ("$@").
_CONTAINER_BOOT = ('export PYTHONPATH="$0${PYTHONPATH:+:$PYTHONPATH}"; '
                   'exec python -m nemo_minitron "$@"')


def job_command(verb: str, argv: list[str], container: bool) -> list[str]:
    """The per-task command: this interpreter, or in a container the image's ``python``
    running this checkout's code (the image's own nemo_minitron when not a checkout)."""
    if not container:
        return [sys.executable, "-m", "nemo_minitron", verb, *argv]
    checkout = checkout_dir()
    if checkout is None:
        return ["python", "-m", "nemo_minitron", verb, *argv]
    return ["bash", "-c", _CONTAINER_BOOT, str(checkout), verb, *argv]


def _existing_dir(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path if path.is_dir() else path.parent


def container_mounts(user: str | None, paths: list[Path]) -> str:
    """``--container-mounts``: the user's, plus each directory of ``paths`` (a file's directory;
    the nearest existing one for a path made later) at its own path unless a user mount
    already maps it there."""
    mounts = [m for m in (user or "").split(",") if m]
    same = [Path(m.split(":")[0]) for m in mounts if m.split(":")[0] == (m.split(":") + [""])[1]]
    dirs = sorted({_existing_dir(p) for p in paths}, key=lambda p: len(p.parts))
    for d in dirs:
        if any(ch in str(d) for ch in ",:"):
            raise ConfigError(f"{str(d)!r} holds ',' or ':', which a container mount cannot "
                              "carry; move it or mount it yourself (--container-mounts)")
        if not any(d == s or s in d.parents for s in same):
            mounts.append(f"{d}:{d}")
            same.append(d)
    return ",".join(mounts)


def render_sbatch(cluster: ClusterConfig, command: list[str], log_dir: str | Path,
                  workdir: str | Path | None = None, paths: list[Path] | None = None) -> str:
    """The sbatch script running ``command`` once per task, with preemption-safe requeue;
    ``paths``: what the job reads and writes (mounted into a container)."""
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
    if c.whole_nodes:
        lines.append("--exclusive")
    if c.mem is not None or c.whole_nodes:
        lines.append(f"--mem={c.mem if c.mem is not None else 0}")
    for flag, value in (("partition", c.partition), ("account", c.account), ("time", c.time)):
        if value:
            lines.append(f"--{flag}={value}")
    lines += [f"--output={log_dir}/%x-%j.out", f"--chdir={workdir}", "--requeue",
              "--open-mode=append", f"--signal=B:USR1@{c.signal_seconds}"]
    srun = ["--kill-on-bad-exit=1"]
    if c.container_image:
        checkout = checkout_dir()
        need = [workdir, log_dir, *([checkout] if checkout else []), *(paths or [])]
        srun += [f"--container-image={c.container_image}", f"--container-workdir={workdir}",
                 f"--container-mounts={container_mounts(c.container_mounts, need)}"]
    text = (launcher_dir() / "templates" / "sbatch.sh").read_text()
    job = (launcher_dir() / "job.sh").read_text()
    return (text.replace("@@SBATCH@@", "\n".join(f"#SBATCH {x}" for x in lines))
            .replace("@@COMMAND@@", " ".join(shlex.quote(w) for w in command))
            .replace("@@SRUN_ARGS@@", " ".join(shlex.quote(w) for w in srun))
            .replace("@@JOB_DIR@@", shlex.quote(str(log_dir)))
            .replace("@@JOB@@", job))

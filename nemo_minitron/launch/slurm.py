"""Talk to SLURM: checks before submission (one-line ConfigErrors) and ``sbatch``."""

from __future__ import annotations

import shutil
import subprocess
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


def submit(script: str, path: Path, after: list[str]) -> str:
    """Write the script to ``path`` and submit it; returns the job id."""
    from nemo_minitron.utils.fs import atomic_write_text

    atomic_write_text(path, script)
    argv = ["sbatch", "--parsable"]
    if after:
        argv.append("--dependency=afterok:" + ":".join(after))
    out = _run([*argv, str(path)]).strip()
    return out.split(";")[0]

"""A one-node SLURM cluster on this machine (``scripts/slurm_up``), started once per session."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """Path of the running cluster's slurm.conf (exported as SLURM_CONF); skips with the
    reason when the cluster cannot be had here (not root, no apt-get)."""
    done = subprocess.run([str(ROOT / "scripts" / "slurm_up")], capture_output=True, text=True,
                          timeout=900)
    if done.returncode == 3:
        pytest.skip(done.stderr.strip() or "no SLURM cluster on this machine")
    assert done.returncode == 0, done.stderr
    conf = done.stdout.strip().splitlines()[-1]
    os.environ["SLURM_CONF"] = conf
    return conf

"""``scripts/slurm_up`` called again while its cluster runs: it must return at once. CI starts
the cluster in the background and the tests' fixture calls it again; daemons that inherited
the provisioning lock or the caller's pipes made that second call wait forever."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[2]


def test_a_second_call_returns_while_the_daemons_run(slurm_cluster: str) -> None:
    done = subprocess.run([str(ROOT / "scripts" / "slurm_up")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == slurm_cluster
    # No daemon may hold the lock: flock -n succeeds only when nobody does.
    lock = Path(slurm_cluster).parent / ".lock"
    free = subprocess.run(["flock", "-n", str(lock), "true"], timeout=10)
    assert free.returncode == 0, f"{lock} is held by a running process"

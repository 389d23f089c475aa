"""The decoding verbs start libgomp with ``OMP_WAIT_POLICY=ACTIVE`` (read back from libgomp's
own ``OMP_DISPLAY_ENV`` report); other verbs and a policy the user set are left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def libgomp_policy(*argv: str, policy: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_DISPLAY_ENV="TRUE", PYTHONPATH=str(ROOT))
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    run = subprocess.run([sys.executable, "-m", "nemo_minitron", *argv], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]  # the missing checkpoint: a user error
    lines = [x for x in run.stderr.splitlines() if "OMP_WAIT_POLICY" in x]
    if not lines:
        pytest.skip("this torch build's OpenMP runtime does not report OMP_DISPLAY_ENV")
    return lines[0].split("=", 1)[1].strip().strip("'")


def test_decoding_verb_spins_and_others_do_not(tmp_path):
    missing = str(tmp_path / "missing")
    assert libgomp_policy("bench", missing) == "ACTIVE"
    assert libgomp_policy("generate", missing, "--prompt", "x") == "ACTIVE"
    assert libgomp_policy("eval", missing, "--data", missing) != "ACTIVE"


def test_a_policy_in_the_environment_is_kept(tmp_path):
    assert libgomp_policy("bench", str(tmp_path / "missing"), policy="PASSIVE") == "PASSIVE"

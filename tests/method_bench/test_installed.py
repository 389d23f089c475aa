"""The study lives in ``benchmarks/method`` of a checkout, not in the library: an installed
``nemo_minitron`` (the package with its recipes and launcher inside, no ``setup.py`` beside
it) answers ``bench-method`` with one ``error:`` line naming the checkout it needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nemo_minitron

PACKAGE = Path(nemo_minitron.__file__).parent


def test_bench_method_from_an_installed_package_is_a_one_line_error(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "nemo_minitron",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for shipped in ("recipes", "launcher"):  # package data of a wheel
        shutil.copytree(PACKAGE.parent / shipped, site / "nemo_minitron" / shipped)
    run = subprocess.run([sys.executable, "-m", "nemo_minitron", "bench-method", "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bench-method runs the study in "
                                                   "benchmarks/method/ of a source checkout")
    assert not (tmp_path / "out").exists()
    # The same command from the checkout finds the study (it fails later, on the recipe).
    here = subprocess.run([sys.executable, "-m", "nemo_minitron", "bench-method",
                           "study.nonexistent=1", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent)
    assert here.returncode == 2 and "study.nonexistent" in here.stderr, here.stderr[-2000:]

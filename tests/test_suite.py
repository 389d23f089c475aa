"""The suite's own machinery: pytest-xdist's ``--dist loadgroup`` keeps a test module on one
worker (``tests/conftest.py``), so module-scoped fixtures (spawned jobs, trained models) are
built once. With pytest 9 and pytest-xdist 3.8 the groups were silently ignored."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Two modules of trivial tests under the suite's own grouping hook (imported, not copied).
CONFTEST = "from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n"
MODULE = "".join(f"def test_{i}():\n    pass\n\n\n" for i in range(8))


def test_loadgroup_keeps_each_module_on_one_worker(tmp_path):
    pytest.importorskip("xdist")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for name in ("test_a.py", "test_b.py"):
        (tmp_path / name).write_text(MODULE)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist",
         "loadgroup", "-v", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    workers: dict[str, set[str]] = defaultdict(set)
    for worker, module in re.findall(r"^\[(gw\d+)\].*?(test_[ab]\.py)::", res.stdout, re.M):
        workers[module].add(worker)
    assert set(workers) == {"test_a.py", "test_b.py"}, res.stdout
    assert all(len(w) == 1 for w in workers.values()), dict(workers)


def test_scripts_test_fails_when_a_selection_matches_nothing():
    """``-k "not dist"`` also matches the ``xdist_group`` marker every test carries, so it
    selects nothing: ``scripts/test`` must say so and fail (pytest's status 5), not pass."""
    env = {**os.environ, "NM_TEST_WORKERS": "0"}
    res = subprocess.run([str(ROOT / "scripts" / "test"), "tests/prune", "-k", "not dist",
                          "--collect-only"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 5, res.stdout[-2000:] + res.stderr[-2000:]
    assert "no test matched the selection: tests/prune -k not dist" in res.stderr
    res = subprocess.run([str(ROOT / "scripts" / "test"), "tests/prune", "-m", "not dist",
                          "--collect-only"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0 and re.search(r"^\d+/\d+ tests collected", res.stdout, re.M), \
        res.stdout[-2000:]

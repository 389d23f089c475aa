"""The suite's own machinery: pytest-xdist's ``--dist loadgroup`` keeps a test module on one
worker (``tests/conftest.py``), so module-scoped fixtures (spawned jobs, trained models) are
built once. With pytest 9 and pytest-xdist 3.8 the groups were silently ignored."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_loadgroup_keeps_each_module_on_one_worker():
    pytest.importorskip("xdist")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist",
         "loadgroup", "-v", "tests/test_config.py", "tests/utils/test_jsonl.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    workers: dict[str, set[str]] = defaultdict(set)
    for worker, module in re.findall(r"^\[(gw\d+)\].*? (tests/[^:\s]+)::", res.stdout, re.M):
        workers[module].add(worker)
    assert set(workers) == {"tests/test_config.py", "tests/utils/test_jsonl.py"}, res.stdout
    assert all(len(w) == 1 for w in workers.values()), dict(workers)

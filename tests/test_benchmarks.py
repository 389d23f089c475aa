"""Every script in ``benchmarks/`` answers ``--help`` with its usage and exit status 0 (run as
``__main__`` in this process: ``--help`` exits before any benchmark work starts); some also run
at tiny scale."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if "__main__" in p.read_text())


def test_every_script_is_found():
    assert {p.name for p in SCRIPTS} >= {"prune_methods.py", "decode_bound.py", "cpu_speed.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_help_prints_usage_and_exits_0(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # scripts put benchmarks/ on the path
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr()
    assert e.value.code in (0, None), out.err[-2000:]
    assert out.out.startswith(f"usage: {script.name}"), out.out[:500] + out.err[-2000:]
    assert "Traceback" not in out.err


def test_prune_methods_help_names_its_arguments(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prune_methods.py", "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(BENCHMARKS / "prune_methods.py"), run_name="__main__")
    usage = capsys.readouterr().out
    for word in ("checkpoint", "recipe", "key=value", "tiny_cpu_prune.yaml"):
        assert word in usage, usage


@pytest.mark.dist
def test_prune_memory_at_tiny_scale():
    """Two processes at TP=2: streaming and the old gather-everything path give the same pruned
    weights; streaming's peak stays near its bound (new shard + one full layer), far under the
    gather's (the whole model per rank)."""
    run = subprocess.run([sys.executable, str(BENCHMARKS / "prune_memory.py"), "--shape",
                          "test", "--repeats", "1"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["same_weights"] and r["tp"] == 2
    bound = r["streaming_bound_new_shard_plus_layer"]
    assert r["streaming_median"] <= bound + 0.1, r  # + a fixed overhead
    assert r["gather_median"] > 2.5 * r["streaming_median"], r

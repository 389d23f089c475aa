"""Every script in ``benchmarks/`` answers ``--help`` with its usage and exit status 0 (run as
``__main__`` in this process: ``--help`` exits before any benchmark work starts)."""

from __future__ import annotations

import runpy
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

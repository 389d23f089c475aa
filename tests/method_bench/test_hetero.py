"""The ``hetero`` section (heterogeneous vs uniform pruning at equal parameters) at a tiny
scale through the CLI, on the session's tiny teacher (``study.teacher``)."""

from __future__ import annotations

import json
import re

from tests.helpers.method_bench import VERDICT, run_bench, smoke_overrides


def test_hetero_section_tiny(tmp_path, data_cache, teacher):
    out, report = tmp_path / "work", tmp_path / "report"
    res = run_bench("bench-method", *smoke_overrides(data_cache), f"study.teacher={teacher}",
                    "study.sections=[hetero]", "--out", str(out), "--report", str(report))
    assert res.returncode == 0, res.stderr[-3000:]
    units = {p.stem: json.loads(p.read_text()) for p in (out / "units").glob("*.json")}
    # Equal parameters: the heterogeneous student fits the uniform one's count.
    budget = units["hetero-shapes-s0"]["budget"]
    assert budget == units["hetero-uniform-s0"]["params"]
    assert units["hetero-s0"]["params"] <= budget
    assert len(units["hetero-shapes-s0"]["shapes"]) == 4
    for name in ("kd-hetero-uniform-s0", "kd-hetero-s0"):  # the same retraining
        assert units[name]["curve"][-1][0] == units["kd-hetero-uniform-s0"]["curve"][-1][0]
    text = (report / "report.md").read_text()
    summary = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in summary.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(rows) == 1 and VERDICT.search(rows[0]), summary
    assert "](hetero.png)" in text
    assert (report / "hetero.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""``search.mode=heterogeneous`` end to end on the tiny teacher: block scores, the exact
choice under the budget, prune (with blockwise local distillation), retrain, report; the
winner is a heterogeneous checkpoint within the budget whose layers are the report's; a re-run
reuses the block scores."""

from __future__ import annotations

import json

import yaml

from tests.cli import run_cli
from tests.helpers.launch import _args

BUDGET = 205200


def test_heterogeneous_search(teacher, tiny_overrides, tmp_path) -> None:
    out = tmp_path / "search"
    args = [a for a in _args(tiny_overrides) if not a.startswith("search.")] + [
        "search.mode=heterogeneous", f"search.target_params={BUDGET}", "search.retrain_steps=2",
        "search.blocks.local_distill_steps=5"]
    res = run_cli("search", teacher, str(out), *args)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["finished"] and summary["winner_params"] <= BUDGET
    root = out / "search"
    report = (root / "report.md").read_text()
    cfg = yaml.safe_load((out / "winner" / "model_config.yaml").read_text())
    shapes = cfg["layer_shapes"]
    assert len(shapes) == 4
    rows = [line for line in report.splitlines() if line.startswith("| ") and
            line.split("|")[1].strip().isdigit()]
    assert len(rows) == 4
    for row, shape in zip(rows, shapes):  # the report's table is the checkpoint's shapes
        attention, mlp = (c.strip() for c in row.split("|")[2:4])
        assert attention.split()[0] == (str(shape.get("num_query_groups"))
                                        if shape["attention"] == "full"
                                        else shape["attention"].replace("_", "-"))
        assert mlp.split()[0] == (str(shape.get("ffn_hidden_size")) if shape["mlp"] == "full"
                                  else shape["mlp"].replace("_", "-"))
    assert (root / "shapes.png").stat().st_size > 0
    pruned = json.loads((root / "candidates" / "heterogeneous" / "pruned" / "pruning" /
                         "summary.json").read_text())
    assert pruned["local_distill_steps"] == 5 and pruned["pruned_params"] <= BUDGET
    stamp = (root / "blocks.json").stat().st_mtime_ns
    res = run_cli("search", teacher, str(out), *args)
    assert res.returncode == 0, res.stderr
    assert (root / "blocks.json").stat().st_mtime_ns == stamp
    assert json.loads(res.stdout.strip().splitlines()[-1]) == summary

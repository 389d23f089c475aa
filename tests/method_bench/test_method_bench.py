"""Smoke test of ``bench-method`` at a tiny scale and one seed: every section runs through the
CLI and the report is well formed; the fixed validation set is the training loop's own
validation set."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers.method_bench import VERDICT, smoke_overrides
from tests.helpers.method_bench import run_bench as run


@pytest.mark.slow
def test_bench_method_smoke(tmp_path, data_cache):
    out, report = tmp_path / "work", tmp_path / "report"
    args = ["bench-method", *smoke_overrides(data_cache), "--out", str(out), "--report",
            str(report)]
    res = run(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    text = (report / "report.md").read_text()
    summary = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in summary.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(rows) == 11, summary
    assert all(VERDICT.search(row) for row in rows), rows
    assert "bench-method" in text and "--report" in text  # the command that regenerates it
    for png in ("aggregation", "width_depth", "kd_vs_ce", "intermediate", "scratch", "teacher",
                "sdd"):
        assert f"]({png}.png)" in text
        assert (report / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    units = {p.stem: json.loads(p.read_text()) for p in (out / "units").glob("*.json")}
    # The fixed validation set is the training loop's own (first seed): the loop's last
    # validation and a fresh evaluation of the saved checkpoint agree.
    for name in ("kd-width-s0", "ce-width-s0", "scratch-width-s0"):
        assert units[name]["curve"][-1][1] == pytest.approx(units[name]["loss"], abs=1e-4)
    assert units["width-s0"]["params"] == pytest.approx(units["depth-s0"]["params"], rel=0.05)
    # The instruction chain: the held-out task loss is the SFT loop's own validation loss (one
    # micro-batch holding every held-out instruction); 4 -> 3 layers; the rewrite counts add
    # up; greedy speculative decoding reproduces the target's own output.
    for name in ("tuned-teacher", "sft-s0", "sdd-s0", "sdd-half-a-s0"):
        assert units[name]["curve"][-1][1] == pytest.approx(units[f"scores-{name}"]["task_loss"],
                                                            abs=1e-4)
    assert units["instruct-data"]["eval_examples"] == 4
    assert len(units["sdd-prune-s0"]["kept_layers"]) == 3
    rw = units["rewrite-s0"]
    assert rw["examples"] == 8 and rw["kept"] == 8 - sum(rw["rejected_by_reason"].values())
    for key in ("pruned", "sft", "sdd"):
        (row,) = units[f"specdec-{key}-s0"]["rows"]
        assert row["draft_tokens"] == 2 and row["greedy_identical"] is True

    # The same command again reuses every unit and writes the same findings.
    again = tmp_path / "again"
    res = run(*args[:-1], str(again))
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (out / "units").glob("*.json")) == sorted(
        f"{n}.json" for n in units)
    assert (again / "report.md").read_text().split("## Summary")[1] == text.split("## Summary")[1]

    # Same --out, other settings: refused before any work, nothing mixed.
    res = run(*args, "retrain.train_iters=6")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: --out ")
    assert "retrain.train_iters differs" in res.stderr


@pytest.mark.parametrize("override, message", [
    ("instruct.gen_prompts=41", "instruct.gen_prompts=41 must be <= instruct.eval_examples=40"),
    ("instruct.train_examples=-1", "instruct.train_examples=-1 must be >= 0"),
    ("sft.eval_interval=30", "sft.eval_interval=30 must be > 0 and divide sft.train_iters=100"),
    ("merge.method=task", "merge.method='task' needs a common base model"),
])
def test_instruct_recipe_checks(override, message):
    from benchmarks.method.config import load_bench_recipe
    from nemo_minitron.config import ConfigError

    assert load_bench_recipe(None, []).instruct.gen_prompts == 16  # the defaults load
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_bench_recipe(None, [override])

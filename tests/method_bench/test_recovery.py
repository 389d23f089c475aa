"""The ``recovery`` section (five ways to recover a pruned instruction model) at a tiny scale,
through the CLI, with ``instruct.tune=false`` (the teacher used as the tuned teacher, as the
real-teacher recipe does); and that recipe itself, without the model package."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.method.config import DEFAULT_RECIPE, load_bench_recipe
from tests.helpers.method_bench import VERDICT, run_bench, smoke_overrides


@pytest.mark.slow
def test_recovery_section_tiny(tmp_path, data_cache):
    out, report = tmp_path / "work", tmp_path / "report"
    # Untuned, the teacher's own context must hold the prompts and answers (instruct.seq_length).
    res = run_bench("bench-method", *smoke_overrides(data_cache), "teacher.model.seq_length=384",
              "study.sections=[specdec,recovery]", "instruct.tune=false",
              "onpolicy.on_policy.sampling.max_new_tokens=8",
              "--out", str(out), "--report", str(report))
    assert res.returncode == 0, res.stderr[-3000:]
    units = {p.stem: json.loads(p.read_text()) for p in (out / "units").glob("*.json")}
    teacher = units["teacher"]["checkpoint"]
    # No tuning: the teacher is scored, pruned and rewrites as the tuned teacher.
    assert "tuned-teacher" not in units and not (out / "runs" / "tuned-teacher").exists()
    assert units["scores-tuned-teacher"]["checkpoint"] == teacher
    # Every trained arm: equal steps and windows, and the loop's last validation (every
    # held-out instruction, one micro-batch) is the separately computed held-out task loss.
    ends = {units[f"sdd-half-{h}-s0"]["curve"][-1][0] for h in "ab"}
    for name in ("sft-s0", "sdd-s0", "ikd-s0", "onpolicy-s0"):
        ends.add(units[name]["curve"][-1][0])
        assert units[name]["curve"][-1][1] == pytest.approx(
            units[f"scores-{name}"]["task_loss"], abs=1e-4), name
    assert len(ends) == 1
    # On-policy samples changed the training: its student differs from instruction KD's.
    assert units["teacher-answer-loss-ikd-s0"]["loss"] != units[
        "teacher-answer-loss-onpolicy-s0"]["loss"]
    # The teacher's answers: the held-out instructions, in order, with new responses.
    ta = units["teacher-answers"]
    mine = [json.loads(x) for x in Path(ta["data"]).read_text().splitlines()]
    held = [json.loads(x) for x in
            Path(units["instruct-data"]["valid"]).read_text().splitlines()]
    assert ta["answers"] == len(mine) == len(held) == 4 and 0 <= ta["cut"] <= 4
    assert [m["instruction"] for m in mine] == [h["instruction"] for h in held]
    assert [m["output"] for m in mine] != [h["output"] for h in held]
    assert units["teacher-answer-loss-tuned-teacher"]["loss"] != units[
        "scores-tuned-teacher"]["task_loss"]
    for key in ("pruned", "sft", "sdd", "ikd", "onpolicy", "merged"):
        (row,) = units[f"specdec-{key}-s0"]["rows"]
        assert row["greedy_identical"] is True, key
    text = (report / "report.md").read_text()
    section = text.split("## Recovering the pruned instruction model", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 7 and rows[0].split(" | ")[-1] == "— |", rows
    summary = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    (line,) = [x for x in summary.splitlines() if re.match(r"^\| 2 \|", x)]  # specdec: 1
    assert VERDICT.search(line) and "SDD over SFT: " in line and "on-policy over KD: " in line


def test_instruct_recipe_is_a_valid_bench_method_recipe():
    path = DEFAULT_RECIPE.with_name("method_bench_smollm2_instruct.yaml")
    r = load_bench_recipe(path, [])
    assert "recovery" in r.study.sections and r.study.seeds == [0]
    assert r.instruct.tune is False and r.instruct.num_layers == 24
    assert r.study.eval_samples == r.retrain.eval_iters * r.retrain.global_batch_size
    assert r.teacher.data.tokenizer == f"{r.study.teacher}/tokenizer"
    assert "shared" in r.study.report_note and "One seed" in r.study.report_note
    assert r.onpolicy.on_policy.fraction > 0 and r.ikd.on_policy.fraction == 0
    # The held-out set is one validation pass of the SFT loop (the curve's last point).
    assert r.instruct.eval_examples == r.sft.eval_iters * r.sft.global_batch_size
    text = path.read_text()
    assert "method_bench_smollm2.yaml" in text and "--report docs/results/instruct-smollm2" in text


@pytest.mark.parametrize("override, message", [
    ("ikd.on_policy.fraction=0.5", "ikd.on_policy.fraction must be 0"),
    ("onpolicy.on_policy.fraction=0", "onpolicy.on_policy.fraction=0 samples nothing"),
])
def test_recovery_recipe_checks(override, message):
    from nemo_minitron.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_bench_recipe(None, [override])

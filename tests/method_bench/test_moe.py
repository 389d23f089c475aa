"""The ``moe`` section (issue 29 item 7) at a tiny scale through the CLI: a 4-expert teacher cut
four ways to the experts arm's total parameter count, one-shot and after a short KD; every
row's counts are the pruned checkpoints' own; the summary states the verdicts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.method.config import load_bench_recipe
from nemo_minitron.config import ConfigError
from tests.helpers.method_bench import VERDICT, run_bench, smoke_overrides

MOE = ["teacher.model.num_moe_experts=4", "teacher.model.moe_router_topk=2",
       "teacher.model.moe_ffn_hidden_size=64", "teacher.model.moe_aux_loss_coeff=0.01",
       "teacher.model.num_layers=2", "study.sections=[moe]", "moe.num_moe_experts=3",
       "moe.moe_ffn_hidden_size_step=8", "moe.hidden_size_step=8",
       # the tiniest run: a 10-step teacher, 2 KD steps
       "teacher.train.train_iters=10", "retrain.train_iters=2", "retrain.eval_interval=2",
       "kd.teacher_max_loss_ratio=2"]


def _counts(checkpoints: list[str], out: str) -> None:
    from nemo_minitron.checkpoint.io import load_model
    from nemo_minitron.config import ParallelConfig

    counts = []
    for ckpt in checkpoints:  # the built models' parameters: total, less E - k experts a layer
        model, cfg, _ = load_model(ckpt, ParallelConfig())
        total = sum(p.numel() for p in model.parameters())
        idle = sum(p.numel() for layer in model.decoder.layers
                   for e in layer.mlp.experts.local_experts[cfg.moe_router_topk:]
                   for p in e.parameters())
        counts.append([total, total - idle])
    Path(out).write_text(json.dumps(counts))


@pytest.mark.slow
def test_moe_section_tiny(tmp_path, data_cache):
    from tests.dist import spawn

    out, report = tmp_path / "work", tmp_path / "report"
    res = run_bench("bench-method", *smoke_overrides(data_cache), *MOE, "--out", str(out),
                    "--report", str(report))
    assert res.returncode == 0, res.stderr[-3000:]
    text = (report / "report.md").read_text()
    units = {p.stem: json.loads(p.read_text()) for p in (out / "units").glob("*.json")}
    arms = ["experts", "expert_width", "hidden", "layers"]
    for arm in arms:  # after KD: the loop's last validation is the fixed set's loss
        kd = units[f"moe-kd-{arm}-s0"]
        assert kd["curve"][-1][1] == pytest.approx(kd["loss"], abs=1e-4), arm
    spawn(_counts, 1, [units["teacher"]["checkpoint"]] + [units[f"moe-{a}-s0"]["checkpoint"]
                                                         for a in arms], str(tmp_path / "c"))
    (t_total, t_active), *counts = json.loads((tmp_path / "c").read_text())
    # Equal total parameters, as near as each axis' grid allows (one of two layers is far);
    # removing experts keeps the active count but for the router's rows, every other arm cuts it.
    want = counts[0][0]
    assert all(abs(total - want) < 0.05 * t_total for total, _ in counts[1:3])
    assert counts[3][0] < t_total and "| remove layers | L1-" in text
    assert t_active - counts[0][1] == 1 * 64 * 2  # one router row of hidden 64 in 2 layers
    assert all(active < counts[0][1] for _, active in counts[1:])
    section = text.split("## Mixture of experts", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 5, rows
    for row, (total, active) in zip(rows, [[t_total, t_active], *counts]):
        assert f"| {total:,} | {active:,} |" in row, (row, total, active)
    assert "L2-H64-E3-EF64" in rows[1] and "Expert width is not in the published" in section
    summary = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    (line,) = [x for x in summary.splitlines() if re.match(r"^\| 1 \|", x)]
    assert VERDICT.search(line) and "experts over layers one-shot: " in line, line
    assert (report / "moe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_moe_section_needs_an_moe_teacher():
    with pytest.raises(ConfigError, match="needs a mixture-of-experts teacher"):
        load_bench_recipe(None, ["study.sections=[moe]"])

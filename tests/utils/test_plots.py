"""``loss.png`` of a real distillation, read back from its Figure: every loss kind on its own
axis, each axis' y-range holding its own curves and not the other kinds' values."""

from __future__ import annotations

from nemo_minitron.utils.fs import read_jsonl_records
from nemo_minitron.utils.plots import loss_figure
from tests.dist import spawn
from tests.helpers.distill import _kd_overrides, distill_job


def test_distillation_losses_get_their_own_axes(tmp_path, teacher, tiny_overrides):
    # The teacher distilled into itself: a KD loss near 0 next to an LM loss of ~5, the case
    # where one shared linear axis drew the KD curve as a flat line at 0.
    run = tmp_path / "self"
    kd = _kd_overrides(tiny_overrides, 2) + ["train.eval_interval=1", "train.eval_iters=1",
                                             "kd.hidden_weight=0", "kd.embedding_weight=0"]
    spawn(distill_job, 1, str(run), teacher, teacher, kd)
    assert (run / "loss.png").stat().st_size > 0  # written by the loop
    records = read_jsonl_records(run / "metrics.jsonl")
    fig = loss_figure(records)
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert sorted(axes) == ["kd loss", "lm loss", "loss"]
    for name, ax in axes.items():
        assert ax.get_ylabel() == name
        want = {kind: [(r["step"], r[name]) for r in records if r["kind"] == kind]
                for kind in ("train", "valid")}
        got = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata()))
               for line in ax.lines}
        assert got == want  # this loss' training and validation curves, nothing else
        lo, hi = ax.get_ylim()
        values = [v for points in want.values() for _, v in points]
        assert lo <= min(values) and max(values) <= hi
    kd_top = axes["kd loss"].get_ylim()[1]
    lm = [r["lm loss"] for r in records if "lm loss" in r]
    assert kd_top < 0.1 * min(lm)  # the KD axis is scaled to the KD values, not the LM ones
    assert axes["kd loss"].get_xlabel() == "" and fig.axes[-1].get_xlabel() == "step"


def test_one_panel_for_one_loss(tmp_path):
    """Pretraining's and SFT's records (one loss each): one labelled panel."""
    records = [{"kind": "train", "step": s, "sft loss": 3.0 - s / 10, "lr": 1e-3}
               for s in (1, 2)] + [{"kind": "valid", "step": 2, "sft loss": 2.9},
                                   {"kind": "speed", "step": 2, "tokens_per_s": 5.0}]
    (ax,) = loss_figure(records).axes
    assert ax.get_title() == ax.get_ylabel() == "sft loss" and ax.get_xlabel() == "step"
    assert sorted(line.get_label() for line in ax.lines) == ["train", "valid"]

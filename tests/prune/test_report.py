"""The pruning report's figures, read back from their Axes: labelled axes, the kept/pruned cut
where the scores put it (recomputed here with ``torch.topk``), the metric that chose the removed
layers plotted with exactly those layers highlighted, readable labels for 30-80 layers."""

from __future__ import annotations

import warnings

import pytest
import torch

from nemo_minitron.config import ModelConfig
from nemo_minitron.importance.scores import Scores
from nemo_minitron.prune.plan import Target, make_plan
from nemo_minitron.prune.report import REMOVED, layer_figure, score_figure, write_report


def _cfg(layers: int) -> ModelConfig:
    return ModelConfig(num_layers=layers, hidden_size=64, ffn_hidden_size=128,
                       num_attention_heads=8, num_query_groups=4, seq_length=32, vocab_size=256)


def _scores(cfg: ModelConfig) -> Scores:
    g = torch.Generator().manual_seed(cfg.num_layers)
    L = cfg.num_layers
    heads = torch.rand(L, 8, generator=g)
    d = torch.rand(L + 1, L + 1, generator=g)
    return Scores(ffn=torch.rand(L, 128, generator=g), heads=heads,
                  groups=heads.view(L, 4, 2).sum(-1),
                  hidden=torch.rand(64, generator=g), layers=torch.rand(L, generator=g),
                  angular_distance=(d + d.T).fill_diagonal_(0),
                  meta={"batch_agg": "l2", "seq_agg": "mean"})


def _plan(cfg: ModelConfig, scores: Scores, target: Target):
    with warnings.catch_warnings():  # widths that are not multiples of 64
        warnings.simplefilter("ignore")
        return make_plan(cfg, scores, target)


def _midway(values: torch.Tensor, k: int) -> float:
    """Midway between the k-th and (k+1)-th largest score."""
    top = torch.topk(values.double(), k + 1).values
    return float(top[k - 1] + top[k]) / 2


def _no_overlap(fig, texts) -> None:
    """Every text inside the figure and none overlapping another (after drawing)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in texts if t.get_text()]
    page = fig.bbox
    for b in boxes:
        assert page.x0 - 1 <= b.x0 and b.x1 <= page.x1 + 1 and page.y0 - 1 <= b.y0 \
            and b.y1 <= page.y1 + 1
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)


def test_score_distributions_are_labelled_and_mark_the_cut():
    cfg = _cfg(30)
    s = _scores(cfg)
    # 27 layers kept by Block Importance, half the channels and neurons, one head of each
    # group's two (every group kept: no cut on that axis).
    plan = _plan(cfg, s, Target(num_layers=27, hidden_size=32, ffn_hidden_size=48,
                                num_attention_heads=4, num_query_groups=4))
    kept_layers = sorted(torch.topk(s.layers, 27).indices.tolist())
    fig = score_figure(s, plan)
    axes = {ax.get_title().split(" (")[0]: ax for ax in fig.axes}
    assert set(axes) == {"MLP neurons", "attention heads", "query groups", "embedding channels"}
    for ax in fig.axes:
        assert "score" in ax.get_xlabel() and "count" in ax.get_ylabel()
    _no_overlap(fig, [t for ax in fig.axes for t in (ax.xaxis.label, ax.yaxis.label, ax.title)])

    def kept_count(ax) -> float:  # the first stacked container holds the kept units
        return sum(p.get_height() for p in ax.containers[0])

    def gid(ax, name):
        return [a for a in [*ax.lines, *ax.patches] if a.get_gid() == name]

    # One threshold over the whole model: the dashed line sits between the 32nd and 33rd score.
    ax = axes["embedding channels"]
    (line,) = gid(ax, "cut")
    assert line.get_xdata()[0] == pytest.approx(_midway(s.hidden, 32))
    assert kept_count(ax) == 32
    # One threshold per kept layer: their range shaded, their median dashed.
    ax = axes["MLP neurons"]
    per_layer = torch.tensor([_midway(s.ffn[i], 48) for i in kept_layers])
    (span,) = gid(ax, "cut-range")
    assert (span.get_x(), span.get_x() + span.get_width()) == pytest.approx(
        (float(per_layer.min()), float(per_layer.max())))
    assert gid(ax, "cut-median")[0].get_xdata()[0] == pytest.approx(float(per_layer.median()))
    assert kept_count(ax) == 27 * 48
    # Heads are ranked inside their group: one threshold per (layer, group), the mean of a
    # group's two head scores when one of them is kept.
    ax = axes["attention heads"]
    per_group = s.heads[kept_layers].view(-1, 2).mean(-1)
    assert gid(ax, "cut-median")[0].get_xdata()[0] == pytest.approx(float(per_group.median()))
    assert kept_count(ax) == 27 * 4
    assert not gid(axes["query groups"], "cut") and not gid(axes["query groups"], "cut-range")


def _dropped(cfg, plan) -> list[int]:
    return sorted(set(range(cfg.num_layers)) - set(plan.kept_layers))


def _bars(fig):
    """(value, tick label, highlighted) per bar, top to bottom."""
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    return [(p.get_width(), label, p.get_facecolor()[:3] == _rgb(REMOVED))
            for p, label in zip(ax.patches, labels)]


def _rgb(color: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(color)


def _layers(label: str) -> list[int]:
    first, _, last = label.partition("-")
    return list(range(int(first), int(last or first) + 1))


@pytest.mark.parametrize("layers", [30, 80])
@pytest.mark.parametrize("metric", ["block_importance", "angular_distance", "lm_loss",
                                    "drop_layers"])
def test_layer_plot_shows_the_metric_that_chose_the_removed_layers(layers, metric):
    cfg = _cfg(layers)
    s = _scores(cfg)
    block = 3
    if metric == "angular_distance":  # per block: distance from its input to its output
        values = [float(s.angular_distance[i, i + block]) for i in range(layers - block + 1)]
        summary = {"block_angular_distance": values}
        target = Target(num_layers=layers - block, layer_metric="angular_distance")
    elif metric == "lm_loss":  # as the prune stage does: the block of least increase, dropped
        values = torch.rand(layers - block + 1, generator=torch.Generator().manual_seed(1))
        start = int(values.argmin())
        summary = {"block_loss_increase": values.tolist()}
        values = values.tolist()
        target = Target(drop_layers=list(range(start, start + block)))
    elif metric == "drop_layers":  # no metric chose them: Block Importance is shown
        values, summary = s.layers.tolist(), {}
        target = Target(drop_layers=[0, 7, layers - 1])
    else:
        values, summary = s.layers.tolist(), {}
        target = Target(num_layers=layers - block)
    plan = _plan(cfg, s, target)
    fig = layer_figure(s, plan, {**summary, "layers_removed_by": metric})
    bars = _bars(fig)
    assert [v for v, _, _ in bars] == pytest.approx(values)
    highlighted = sorted(i for _, label, red in bars if red for i in _layers(label))
    assert highlighted == _dropped(cfg, plan)
    if metric != "drop_layers":  # the removed layers are the lowest bars of what is plotted
        assert max(v for v, _, red in bars if red) <= min(v for v, _, red in bars if not red)
    (ax,) = fig.axes
    name = {"block_importance": "Block Importance", "angular_distance": "angular distance",
            "lm_loss": "LM-loss increase", "drop_layers": "Block Importance"}[metric]
    assert name in ax.get_xlabel() and name in ax.get_title() and ax.get_ylabel()
    if metric == "drop_layers":
        assert "target.drop_layers" in ax.get_title()
    _no_overlap(fig, [*ax.get_yticklabels(), ax.xaxis.label, ax.yaxis.label, ax.title])


def test_nothing_removed_and_baseline_scores_are_named(tmp_path):
    cfg = _cfg(30)
    s = _scores(cfg)
    s.meta = {"importance": "magnitude"}
    fig = layer_figure(s, _plan(cfg, s, Target(ffn_hidden_size=64)), {"layers_removed_by": None})
    (ax,) = fig.axes
    assert "weight norm" in ax.get_xlabel() and "no layer removed" in ax.get_title()
    assert not any(red for _, _, red in _bars(fig))
    plan = _plan(cfg, s, Target(num_layers=28, ffn_hidden_size=64))
    write_report(tmp_path, s, plan, {"layers_removed_by": "block_importance"})
    for name in ("report.md", "layer_importance.png", "score_distributions.png"):
        assert (tmp_path / name).stat().st_size > 0

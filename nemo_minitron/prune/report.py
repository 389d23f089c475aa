"""The pruning report: per-axis statistics, parameter counts, plots (PNG), Markdown.

The figures are built by ``layer_figure`` and ``score_figure``, which return the matplotlib
``Figure`` (tests read what was drawn back from its Axes); ``write_report`` saves them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nemo_minitron.importance.scores import Scores
from nemo_minitron.model.layouts import group_heads
from nemo_minitron.prune.plan import PrunePlan

KEPT, REMOVED = "tab:blue", "tab:red"

UNITS = {"ffn": "MLP neurons", "heads": "attention heads", "groups": "query groups",
         "hidden": "embedding channels"}
"""What one unit of each width axis is."""

_ACTIVATION = {"ffn": "activation entering linear_fc2",
               "heads": "head output norm (linear_proj input)",
               "groups": "sum of its heads' scores",
               "hidden": "layernorm outputs, summed over layers"}

_LAYER_METRICS = {  # short name (title), axis label
    "block_importance": ("Block Importance", "Block Importance, 1 - cos(layer input, output)"),
    "magnitude": ("weight norm", "weight norm of the layer (L2)"),
    "random": ("random score", "random score"),
    "lm_loss": ("LM-loss increase", "validation LM-loss increase without the block (nats)"),
    "angular_distance": ("angular distance",
                         "angular distance arccos(cos)/pi, block input to block output"),
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def kept_mask(scores: Scores, plan: PrunePlan, axis: str) -> torch.Tensor:
    """Booleans shaped like ``scores.<axis>``: True where ``plan`` keeps the unit (every unit of
    a removed layer is False)."""
    mask = torch.zeros(getattr(scores, axis).shape, dtype=torch.bool)
    if axis == "hidden":
        mask[plan.kept_hidden] = True
    elif axis == "layers":
        mask[plan.kept_layers] = True
    else:
        for i, kept in getattr(plan, f"kept_{axis}").items():
            mask[i, kept.flatten()] = True
    return mask


def _cut(values: torch.Tensor, kept: torch.Tensor) -> float | None:
    """Midway between the lowest kept and the highest pruned score; None unless both exist."""
    if bool(kept.all()) or not bool(kept.any()):
        return None
    return float(values[kept].min() + values[~kept].max()) / 2


def cuts(scores: Scores, plan: PrunePlan, axis: str) -> list[float]:
    """The score thresholds between kept and pruned units of a width axis, one per set of units
    ranked together: the whole model (hidden_size), each kept layer (ffn, query groups), each
    kept query group of a kept layer (heads are ranked inside their group)."""
    values, mask = getattr(scores, axis), kept_mask(scores, plan, axis)
    if axis == "hidden":
        sets = [(values, mask)]
    elif axis == "heads":
        sets = [(values[i, h], mask[i, h]) for i in plan.kept_layers if i in plan.kept_groups
                for h in (group_heads(plan.source, g) for g in plan.kept_groups[i].tolist())]
    else:
        sets = [(values[i], mask[i]) for i in plan.kept_layers]
    return [c for c in (_cut(v, k) for v, k in sets) if c is not None]


def _score_label(scores: Scores, axis: str) -> str:
    how = scores.meta.get("importance", "activation")
    if how == "activation":
        agg = (f"{scores.meta.get('seq_agg', 'mean')} over tokens, "
               f"{scores.meta.get('batch_agg', 'l2')} over sequences")
        return f"score: {_ACTIVATION[axis]}\n({agg})"
    return "score: weight magnitude (L2)" if how == "magnitude" else "score: random"


def score_figure(scores: Scores, plan: PrunePlan) -> Any:
    """One histogram per width axis over the units of the kept layers, kept and pruned units
    stacked in their colours, with the cut: a dashed line where one threshold decides (gid
    ``cut``); where each layer (or group) has its own, their range shaded (gid ``cut-range``)
    and their median dashed (gid ``cut-median``)."""
    plt = _plt()
    fig, axs = plt.subplots(2, 2, figsize=(10, 7.5))
    for ax, axis in zip(axs.flat, UNITS):
        values, mask = getattr(scores, axis), kept_mask(scores, plan, axis)
        if axis != "hidden":  # units of removed layers went with their layer
            values, mask = values[plan.kept_layers], mask[plan.kept_layers]
        values, mask = values.flatten().double(), mask.flatten()
        ax.hist([values[mask].numpy(), values[~mask].numpy()], bins=40, stacked=True,
                color=[KEPT, REMOVED], label=[f"kept ({int(mask.sum())})",
                                              f"pruned ({int((~mask).sum())})"])
        c = cuts(scores, plan, axis)
        if len(c) == 1:
            ax.axvline(c[0], color="k", ls="--", lw=1, gid="cut", label=f"cut {c[0]:.3g}")
        elif c:
            t = torch.tensor(c)
            per = "query group" if axis == "heads" else "layer"
            ax.axvspan(float(t.min()), float(t.max()), color="0.5", alpha=0.2, gid="cut-range",
                       label=f"{len(c)} cuts, one per {per}: {float(t.min()):.3g}-"
                       f"{float(t.max()):.3g}")
            med = float(t.median())
            ax.axvline(med, color="k", ls="--", lw=1, gid="cut-median",
                       label=f"median cut {med:.3g}")
        removed = plan.source.num_layers - len(plan.kept_layers)
        ax.set_title(UNITS[axis] + (f" ({len(plan.kept_layers)} kept layers)" if removed and
                                    axis != "hidden" else ""), fontsize=10)
        ax.set_xlabel(_score_label(scores, axis), fontsize=8)
        ax.set_ylabel(f"{UNITS[axis]} (count, log scale)", fontsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def layer_figure(scores: Scores, plan: PrunePlan, summary: dict[str, Any]) -> Any:
    """Horizontal bars of the metric that chose the removed layers (``summary
    ["layers_removed_by"]``): per-layer scores, or per-block values for the block metrics
    (``lm_loss``, ``angular_distance``); the removed layers' bars (and tick labels) red. The
    figure grows with the number of bars, so 80 layers keep readable labels."""
    plt = _plt()
    by = summary.get("layers_removed_by")
    removed = sorted(set(range(plan.source.num_layers)) - set(plan.kept_layers))
    per_block = {"lm_loss": "block_loss_increase", "angular_distance": "block_angular_distance"}
    if by in per_block:
        values = list(summary[per_block[by]])
        block = len(removed)
        labels = [str(i) if block == 1 else f"{i}-{i + block - 1}" for i in range(len(values))]
        red = [list(range(i, i + block)) == removed for i in range(len(values))]
        (name, metric), ylabel = _LAYER_METRICS[by], ("layer" if block == 1 else
                                                      f"block of {block} layers")
    else:
        values = scores.layers.tolist()
        labels = [str(i) for i in range(len(values))]
        red = [i in removed for i in range(len(values))]
        how = scores.meta.get("importance", "activation")
        name, metric = _LAYER_METRICS["block_importance" if how == "activation" else how]
        ylabel = "layer"
    n = len(values)
    fig, ax = plt.subplots(figsize=(7, max(3.0, 1.2 + 0.17 * n)))
    ax.barh(range(n), values, color=[REMOVED if r else KEPT for r in red])
    ax.set_yticks(range(n), labels, fontsize=7 if n > 24 else 9)
    for tick, r in zip(ax.get_yticklabels(), red):
        tick.set_color(REMOVED if r else "black")
    ax.set_ylim(n - 0.5, -0.5)  # layer 0 on top
    ax.set_ylabel(ylabel)
    ax.set_xlabel(metric, fontsize=9)
    if by is None:
        ax.set_title(f"{name}; no layer removed", fontsize=10)
    else:
        how = "target.drop_layers" if by == "drop_layers" else f"lowest {name}"
        ax.set_title(f"{name}; removed (red) by {how}: {removed}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def write_report(out_dir: Path, scores: Scores, plan: PrunePlan, summary: dict[str, Any]) -> None:
    """``report.md``, ``layer_importance.png`` and ``score_distributions.png`` in ``out_dir``."""
    _save(layer_figure(scores, plan, summary), out_dir / "layer_importance.png")
    _save(score_figure(scores, plan), out_dir / "score_distributions.png")

    src, new = plan.source, plan.config
    lines = ["# Pruning report", "", "| axis | source | pruned | score min | mean | max |",
             "| --- | --- | --- | --- | --- | --- |"]
    for axis in Scores.AXES:
        t: torch.Tensor = getattr(scores, axis)
        size = Scores.SIZES[axis]
        before = src.query_groups if axis == "groups" else getattr(src, size)
        after = new.query_groups if axis == "groups" else getattr(new, size)
        lines.append(f"| {size} | {before} | {after} | {t.min():.4g} | {t.mean():.4g} | "
                     f"{t.max():.4g} |")
    lines += ["", f"Kept layers: {plan.kept_layers}", ""]
    if new.is_heterogeneous:  # the table above holds the defaults; each layer has its own
        shapes = [new.layer_shape(i) for i in range(new.num_layers)]
        lines += ["| layer | attention | query groups | MLP | ffn_hidden_size |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {i} | {x.attention} | {x.num_query_groups or '-'} | {x.mlp} | "
                  f"{x.ffn_hidden_size or '-'} |" for i, x in enumerate(shapes)]
        lines.append("")
    for key, title in (("block_angular_distance", "angular distance arccos(cos)/pi between "
                        "the hidden states entering and leaving the block"),
                       ("block_loss_increase", "validation LM-loss increase without the block")):
        values = summary.get(key)
        if values:
            block = src.num_layers - len(values) + 1
            lines += [f"Blocks of {block} layers, {title}:", "", "| layers | value |",
                      "| --- | --- |"]
            lines += [f"| {i}..{i + block - 1} | {v:.6g} |" for i, v in enumerate(values)]
            lines.append("")
    for k, v in summary.items():
        lines.append(f"- {k}: {v:.6g}" if isinstance(v, float) else f"- {k}: {v}")
    lines += ["", "![layer importance](layer_importance.png)", "",
              "![score distributions](score_distributions.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))

"""The pruning report: per-axis statistics, parameter counts, plots (PNG), Markdown.

The figures are built by ``layer_figure``, ``score_figure`` and (MoE) ``expert_figure``, which
return the matplotlib
``Figure`` (tests read what was drawn back from its Axes); ``write_report`` saves them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nemo_minitron.importance.scores import Scores
from nemo_minitron.model.layouts import group_heads
from nemo_minitron.prune.moe import EXPERT_SCORES
from nemo_minitron.prune.plan import PrunePlan

KEPT, REMOVED = "tab:blue", "tab:red"

UNITS = {"ffn": "MLP neurons", "heads": "attention heads", "groups": "query groups",
         "hidden": "embedding channels"}
"""What one unit of each width axis is."""
MOE_UNITS = {"expert_ffn": "expert channels", "heads": "attention heads",
             "groups": "query groups", "hidden": "embedding channels"}
"""The width axes of an MoE model (its layers have experts, not an MLP); with
``target.moe_ffn_selection=per_expert`` ``expert_channels`` stands for ``expert_ffn``."""
MOE_ROWS = (("experts", "num_moe_experts"), ("expert_ffn", "moe_ffn_hidden_size"),
            ("shared_expert_ffn", "moe_shared_expert_intermediate_size"))
"""MoE score axes and the config field that counts their units."""

_ACTIVATION = {"ffn": "activation entering linear_fc2",
               "expert_ffn": "root mean square over tokens of the router-weighted activation\n"
                             "entering the experts' linear_fc2, all experts of the layer",
               "expert_channels": "root mean square over tokens of the router-weighted "
                                  "activation\nentering each expert's linear_fc2",
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
    elif axis == "expert_channels":  # per expert; a removed expert's channels went with it
        for i, kept in plan.kept_expert_ffn.items():
            for e in plan.kept_experts[i].tolist():
                mask[i, e, kept[e] if kept.dim() == 2 else kept] = True
    else:
        kept_by_layer = plan.kept_shared_ffn if axis == "shared_expert_ffn" else getattr(
            plan, f"kept_{axis}")
        for i, kept in kept_by_layer.items():
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
    elif axis == "expert_channels":
        sets = [(values[i, e], mask[i, e]) for i in plan.kept_layers
                for e in plan.kept_experts[i].tolist()]
    else:
        sets = [(values[i], mask[i]) for i in plan.kept_layers]
    return [c for c in (_cut(v, k) for v, k in sets) if c is not None]


def _score_label(scores: Scores, axis: str) -> str:
    how = scores.meta.get("importance", "activation")
    if how == "activation" and axis in ("expert_ffn", "expert_channels"):  # importance.moe's
        return f"score: {_ACTIVATION[axis]}"
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
    units = MOE_UNITS if plan.source.is_moe else UNITS
    if plan.moe_ffn_selection == "per_expert":
        units = {("expert_channels" if a == "expert_ffn" else a): (
            "expert channels, per expert" if a == "expert_ffn" else u) for a, u in units.items()}
    for ax, axis in zip(axs.flat, units):
        values, mask = getattr(scores, axis), kept_mask(scores, plan, axis)
        if axis == "expert_channels":  # kept experts of kept layers
            keep = torch.zeros(values.shape[:2], dtype=torch.bool)
            for i in plan.kept_layers:
                keep[i, plan.kept_experts[i]] = True
            values, mask = values[keep], mask[keep]
        elif axis != "hidden":  # units of removed layers went with their layer
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
            per = {"heads": "query group", "expert_channels": "expert"}.get(axis, "layer")
            ax.axvspan(float(t.min()), float(t.max()), color="0.5", alpha=0.2, gid="cut-range",
                       label=f"{len(c)} cuts, one per {per}: {float(t.min()):.3g}-"
                       f"{float(t.max()):.3g}")
            med = float(t.median())
            ax.axvline(med, color="k", ls="--", lw=1, gid="cut-median",
                       label=f"median cut {med:.3g}")
        removed = plan.source.num_layers - len(plan.kept_layers)
        ax.set_title(units[axis] + (f" ({len(plan.kept_layers)} kept layers)" if removed and
                                    axis != "hidden" else ""), fontsize=10)
        ax.set_xlabel(_score_label(scores, axis), fontsize=8)
        ax.set_ylabel(f"{units[axis]} (count, log scale)", fontsize=8)
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


def expert_figure(scores: Scores, plan: PrunePlan) -> Any:
    """MoE: per layer (rows) and expert (columns), the score that ranked the experts (left:
    ``Scores.experts`` or ``expert_mass`` by ``target.expert_metric``) and the routing load
    (right: ``Scores.expert_load``, the share of tokens routed to the expert) as heat maps;
    the removed experts of kept layers crossed in red (gid ``removed``)."""
    plt = _plt()
    metric = EXPERT_SCORES[plan.expert_metric]
    panels = [(getattr(scores, metric), f"expert score ({metric})")]
    if scores.expert_load is not None:
        panels.append((scores.expert_load, "routing load (share of tokens)"))
    L, E = panels[0][0].shape
    fig, axs = plt.subplots(1, len(panels), figsize=(4 + 3 * len(panels) + 0.08 * E,
                                                      max(3.0, 1.5 + 0.25 * L)), squeeze=False)
    mask = kept_mask(scores, plan, "experts")
    gone = [(e, i) for i in plan.kept_layers for e in range(E) if not mask[i, e]]
    for ax, (values, title) in zip(axs.flat, panels):
        im = ax.imshow(values.double().numpy(), aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax, fraction=0.05)
        if gone:
            ax.scatter([e for e, _ in gone], [i for _, i in gone], marker="x", s=30,
                       color=REMOVED, gid="removed", label=f"pruned ({len(gone)})")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_title(title, fontsize=10)
        ax.set_yticks(range(0, L, max(1, L // 24)))
        ax.set_xticks(range(0, E, max(1, E // 32)))
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
    fig.tight_layout()
    return fig


def expert_table(scores: Scores, plan: PrunePlan) -> list[str]:
    """MoE: the Markdown table of every layer's expert scores and routing loads (``score /
    load`` per expert; removed experts struck through, removed layers marked)."""
    metric = EXPERT_SCORES[plan.expert_metric]
    values, load = getattr(scores, metric), scores.expert_load
    mask = kept_mask(scores, plan, "experts")
    E = values.shape[1]
    lines = [f"Experts per layer: score ({metric}) / routing load; removed ones struck "
             "through:", "", "| layer | " + " | ".join(f"e{e}" for e in range(E)) + " |",
             "| --- |" + " --- |" * E]
    for i in range(values.shape[0]):
        cells = [f"{values[i, e]:.3g}" + ("" if load is None else f" / {load[i, e]:.3g}")
                 for e in range(E)]
        cells = [c if mask[i, e] or i not in plan.kept_layers else f"~~{c}~~"
                 for e, c in enumerate(cells)]
        name = str(i) if i in plan.kept_layers else f"~~{i}~~ (removed)"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def write_report(out_dir: Path, scores: Scores, plan: PrunePlan, summary: dict[str, Any]) -> None:
    """``report.md``, ``layer_importance.png``, ``score_distributions.png`` and (MoE)
    ``experts.png`` in ``out_dir``."""
    _save(layer_figure(scores, plan, summary), out_dir / "layer_importance.png")
    _save(score_figure(scores, plan), out_dir / "score_distributions.png")

    src, new = plan.source, plan.config
    lines = ["# Pruning report", "", "| axis | source | pruned | score min | mean | max |",
             "| --- | --- | --- | --- | --- | --- |"]
    rows = [(a, Scores.SIZES[a]) for a in Scores.AXES if not (src.is_moe and a == "ffn")]
    for axis, size in rows + ([r for r in MOE_ROWS if getattr(scores, r[0]) is not None]
                              if src.is_moe else []):
        t: torch.Tensor = getattr(scores, axis)
        before = src.query_groups if axis == "groups" else getattr(src, size)
        after = new.query_groups if axis == "groups" else getattr(new, size)
        lines.append(f"| {size} | {before} | {after} | {t.min():.4g} | {t.mean():.4g} | "
                     f"{t.max():.4g} |")
    lines += ["", f"Kept layers: {plan.kept_layers}", ""]
    if src.is_moe:
        _save(expert_figure(scores, plan), out_dir / "experts.png")
        lines += [*expert_table(scores, plan), "![experts](experts.png)", ""]
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

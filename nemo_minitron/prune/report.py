"""The pruning report: per-axis statistics, parameter counts, plots (PNG), Markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nemo_minitron.importance.scores import Scores
from nemo_minitron.prune.plan import PrunePlan


def write_report(out_dir: Path, scores: Scores, plan: PrunePlan, summary: dict[str, Any]) -> None:
    """``report.md``, ``layer_importance.png`` and ``score_distributions.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    bi = scores.num_layers.tolist()
    ax.bar(range(len(bi)), bi, color=["tab:blue" if i in plan.layers else "tab:red"
                                      for i in range(len(bi))])
    ax.set_xticks(range(len(bi)))
    ax.set_xlabel("layer (red: removed)")
    ax.set_ylabel("Block Importance (1 - cos)")
    fig.tight_layout()
    fig.savefig(out_dir / "layer_importance.png", dpi=110)
    plt.close(fig)

    axes = [a for a in Scores.AXES if a != "num_layers"]
    fig, axs = plt.subplots(1, len(axes), figsize=(4 * len(axes), 3.2))
    for ax, axis in zip(axs, axes):
        ax.hist(getattr(scores, axis).flatten().numpy(), bins=40)
        ax.set_title(axis)
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out_dir / "score_distributions.png", dpi=110)
    plt.close(fig)

    src, new = plan.source, plan.config
    lines = ["# Pruning report", "", "| axis | source | pruned | score min | mean | max |",
             "| --- | --- | --- | --- | --- | --- |"]
    for axis in Scores.AXES:
        t: torch.Tensor = getattr(scores, axis)
        before = src.query_groups if axis == "num_query_groups" else getattr(src, axis)
        after = new.query_groups if axis == "num_query_groups" else getattr(new, axis)
        lines.append(f"| {axis} | {before} | {after} | {t.min():.4g} | {t.mean():.4g} | "
                     f"{t.max():.4g} |")
    lines += ["", f"Kept layers: {plan.layers}", ""]
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

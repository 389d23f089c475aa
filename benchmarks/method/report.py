"""The method benchmark's Markdown report and its PNG plots."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from benchmarks.method.verdicts import Section


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, list[list[float]]], title: str, out: Path) -> None:
    """Validation loss against training tokens, one line per run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", markersize=3, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_grid(grid: dict[str, list[float]], out: Path) -> None:
    """Heat map of the aggregation ablation (mean one-shot loss over seeds)."""
    import numpy as np

    plt = _plt()
    aggs = ["mean", "l2", "var"]
    m = np.array([[np.mean(grid[f"{b}/{q}"]) for q in aggs] for b in aggs])
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(m, cmap="viridis_r")
    ax.set_xticks(range(3), [f"seq {q}" for q in aggs])
    ax.set_yticks(range(3), [f"batch {b}" for b in aggs])
    for i in range(3):
        for j in range(3):
            dark = (m[i, j] - m.min()) > 0.5 * (m.max() - m.min())  # viridis_r: high is dark
            ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=9,
                    color="w" if dark else "k")
    fig.colorbar(im, ax=ax, label="one-shot loss")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(sections: list[Section], out_dir: Path, *, command: str, minutes: float,
                 eval_desc: str, seeds: list[int], note: str = "") -> Path:
    """``out_dir/report.md`` plus one PNG per plotted section."""
    import megatron.core
    import torch

    from nemo_minitron.utils.fs import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    cores = len(__import__("os").sched_getaffinity(0))
    head = [
        "# Minitron's published findings, reproduced in miniature",
        "",
        "Regenerate with:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Ran in {minutes:.0f} minutes on {cores} CPU cores ({platform.machine()}), torch "
        f"{torch.__version__}, megatron-core {megatron.core.__version__}. "
        + (f"{note.strip()} " if note.strip() else "")
        + f"Every loss is the "
        f"validation LM loss (nats per token) {eval_desc}, unless a section says otherwise. "
        f"Seeds {seeds}: each seed draws another calibration set and training order (and "
        "rewrite sampling); values are mean ± half the range over seeds. A claim \"A beats B\" "
        "is *agree* when A beats B at every seed, *disagree* when B beats A at every seed, "
        "*tie* when equal at every seed, else *inconclusive*. The published claims are from "
        "Minitron (arXiv 2407.14679, 2408.11796) and, for self-data distillation, merging and "
        "speculative decoding, arXiv 2410.09982; disagreement at this scale is a result, not a "
        "failure.",
        "",
        "## Summary",
        "",
    ]
    numbered = [s for s in sections if s["claim"]]
    head.append(_table(["#", "published finding", "here"],
                       [[i + 1, s["claim"], f"**{s['verdict']}**"]
                        for i, s in enumerate(numbered)]))
    body: list[str] = []
    for s in sections:
        body += ["", f"## {s['title']}", ""]
        if s["claim"]:
            body += [f"Published: {s['claim']}.", ""]
        body.append(_table(s["header"], s["rows"]))
        if s["claim"]:
            body += ["", f"**Verdict: {s['verdict']}.**" + (f" {s['detail']}"
                                                           if s.get("detail") else "")]
        elif s.get("detail"):
            body += ["", s["detail"]]
        if s.get("grid"):
            plot_grid(s["grid"], out_dir / f"{s['key']}.png")
            body += ["", f"![{s['key']}]({s['key']}.png)"]
        if s.get("curves"):
            plot_curves(s["curves"], s["title"], out_dir / f"{s['key']}.png")
            body += ["", f"![{s['key']}]({s['key']}.png) (first seed)"]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(head + body) + "\n")
    return path

"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from nemo_minitron.utils.fs import read_jsonl


def plot_loss_curves(metrics_file: str | Path, out_png: str | Path) -> Path | None:
    """Training and validation loss against step, from a ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_file = Path(metrics_file)
    if not metrics_file.is_file():
        return None
    records = read_jsonl(metrics_file)
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, style in (("train", "-"), ("valid", "o-")):
        rows = [r for r in records if r["kind"] == kind]
        if not rows:
            continue
        names = [k for k in rows[0] if k.endswith("loss")]
        for name in names:
            ax.plot([r["step"] for r in rows], [r[name] for r in rows], style,
                    label=f"{kind} {name}", alpha=0.8, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)

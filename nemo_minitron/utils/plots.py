"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemo_minitron.utils.fs import read_jsonl_records


def loss_figure(records: list[dict[str, Any]]) -> Any:
    """Training and validation losses against step, from ``metrics.jsonl`` records: one panel
    per loss kind (every metric named ``... loss``), since their scales differ by orders of
    magnitude (a KD loss of 0.01-0.1 next to an LM loss of ~5 would be a flat line at 0 on a
    shared axis). Returns the matplotlib ``Figure``; its panels' titles are the loss names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in records if r.get("kind") in ("train", "valid")]
    names = list(dict.fromkeys(k for r in rows for k in r if k.endswith("loss")))
    fig, axs = plt.subplots(max(1, len(names)), 1, figsize=(7, 1.2 + 2.4 * max(1, len(names))),
                            sharex=True, squeeze=False)
    for ax, name in zip(axs[:, 0], names):
        for kind, style in (("train", "-"), ("valid", "o-")):
            points = [(r["step"], r[name]) for r in rows if r["kind"] == kind and name in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, label=kind, alpha=0.8, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axs[-1, 0].set_xlabel("step")
    axs[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    fig.tight_layout()
    return fig


def plot_loss_curves(metrics_file: str | Path, out_png: str | Path) -> Path | None:
    """``loss_figure`` of a ``metrics.jsonl``, saved to ``out_png`` (written whole, then
    renamed); None when there is no metrics file."""
    metrics_file, out_png = Path(metrics_file), Path(out_png)
    if not metrics_file.is_file():
        return None
    fig = loss_figure(read_jsonl_records(metrics_file))
    import matplotlib.pyplot as plt  # after loss_figure chose the headless backend

    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png

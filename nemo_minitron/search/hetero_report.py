"""The heterogeneous search's report: the chosen per-layer shapes as a table
(``OUT/search/report.md``) and a plot (``shapes.png``: per layer, the kept MLP width and query
groups, linear and no-op blocks marked), with the retraining's loss curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemo_minitron.config.hetero import LayerShape
from nemo_minitron.search.blocks import LayerLibrary
from nemo_minitron.utils.fs import atomic_write_text


def _block(kind: str, size: int | None, of: int) -> str:
    return f"{size} ({100 * size / of:.0f}%)" if kind == "full" else kind.replace("_", "-")


def write_hetero_report(root: Path, record: dict[str, Any], lib: LayerLibrary,
                        shapes: list[LayerShape], source: Any, source_params: int,
                        budget: str) -> None:
    """``root/report.md``, ``root/shapes.png`` and ``root/loss_curves.png``."""
    from nemo_minitron.search.report import plot_curves

    g, f = source.query_groups, source.ffn_hidden_size
    lines = ["# Heterogeneous architecture search", "",
             f"Source: {source_params:,} parameters; budget {budget}; chosen model "
             f"{record['params']:,} parameters. One block per layer chosen by the exact solver "
             f"(least summed block score, KL of the source with only that block replaced); "
             f"validation LM loss {record['one_shot_loss']:.4f} one-shot, "
             f"{record['retrained_loss']:.4f} after {record['retrain_steps']} distillation "
             f"steps.", "",
             f"| layer | attention (query groups of {g}) | MLP (width of {f}) | parameters | "
             f"block score |", "| --- | --- | --- | --- | --- |"]
    for row, shape, shapes_i, scores_i in zip(record["layers"], shapes, lib.shapes, lib.scores):
        score = scores_i[shapes_i.index(shape)]
        lines.append(f"| {row['layer']} | {_block(row['attention'], row['num_query_groups'], g)} "
                     f"| {_block(row['mlp'], row['ffn_hidden_size'], f)} | {row['params']:,} "
                     f"| {score:.4g} |")
    lines += ["", "![per-layer shapes](shapes.png)", "",
              "![validation loss during retraining](loss_curves.png)", ""]
    atomic_write_text(root / "report.md", "\n".join(lines))
    plot_shapes(record["layers"], g, f, root / "shapes.png")
    plot_curves([record], root / "loss_curves.png")


def plot_shapes(rows: list[dict[str, Any]], groups: int, ffn: int, png: Path) -> None:
    """Per layer: the kept share of the MLP width and of the query groups as bars; a linear
    block drawn as a hatched bar labelled ``linear``, a no-op block as an empty slot labelled
    ``no-op``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(rows) + 2), 5.5), sharex=True)
    for ax, kind, size, of, title in ((axs[0], "attention", "num_query_groups", groups,
                                       f"attention: query groups kept (of {groups})"),
                                      (axs[1], "mlp", "ffn_hidden_size", ffn,
                                       f"MLP: width kept (of {ffn})")):
        for r in rows:
            x, block = r["layer"], r[kind]
            if block == "full":
                ax.bar(x, r[size] / of, color="tab:blue")
                ax.text(x, r[size] / of, str(r[size]), ha="center", va="bottom", fontsize=7)
            elif block == "linear":
                ax.bar(x, 1.0, color="none", edgecolor="tab:orange", hatch="//")
                ax.text(x, 0.5, "linear", ha="center", rotation=90, fontsize=7)
            else:
                ax.text(x, 0.05, "no-op", ha="center", rotation=90, fontsize=7, color="tab:red")
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("share of the source")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axs[1].set_xlabel("layer")
    axs[1].set_xticks([r["layer"] for r in rows])
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)

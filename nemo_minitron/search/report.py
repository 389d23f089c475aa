"""Ranking of the finished candidates, the Spearman correlation of the one-shot and retrained
rankings, ``report.md`` and ``loss_curves.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemo_minitron.utils.fs import atomic_write_text


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, lowest value first; ties share their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks; None
    when it is undefined (fewer than 2 items or a constant ranking)."""
    if len(a) != len(b) or len(a) < 2:
        return None
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / (va * vb) ** 0.5


def rank_records(records: list[dict[str, Any]]) -> float | None:
    """Fill ``rank_one_shot`` and ``rank_retrained`` (1 = best) of finished records; return the
    Spearman correlation of the two rankings."""
    one_shot = ranks([r["one_shot_loss"] for r in records])
    after = ranks([r["score"] for r in records])
    for r, x, y in zip(records, one_shot, after):
        r["rank_one_shot"], r["rank_retrained"] = x, y
    return spearman(one_shot, after)


def retraining_losses(history: list[dict[str, float]]) -> dict[str, Any]:
    """A candidate's ``one_shot_loss``, ``curve`` and ``retrained_loss`` from its retraining's
    validation ``history``: all three are the loop's validation LM loss on one validation set,
    so the one-shot loss is the curve's step 0 (prune's own figure is measured on
    ``calib.eval_samples`` other sequences and would not compare)."""
    if not history or history[0]["step"] != 0:
        raise RuntimeError("the retraining has no validation at step 0 (the one-shot loss)")
    curve = [[h["step"], h["lm loss"]] for h in history]
    return {"one_shot_loss": curve[0][1], "curve": curve, "retrained_loss": curve[-1][1]}


def _fmt_rank(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:.1f}"


def write_report(out: Path, records: list[dict[str, Any]], rho: float | None,
                 source_params: int, target_params: int, score_fn: str | None,
                 budget: str = "total", source_active: int | None = None) -> None:
    """``out/report.md``: one row per candidate, best (retrained) first; a user score gets
    its own column. An MoE search (``source_active`` set) shows experts, their width and the
    active parameters; ``budget``: the count ``target_params`` bounds."""
    rows = sorted(records, key=lambda r: (r["rank_retrained"], r["name"]))
    by = f"score ({score_fn})" if score_fn else "validation LM loss"
    moe = source_active is not None
    mlp = "experts | expert ffn" if moe else "ffn"
    source = f"{source_params:,} parameters" + (f" ({source_active:,} active)" if moe else "")
    lines = [
        "# Architecture search", "",
        f"Source: {source}; budget {target_params:,} {budget} parameters. Ranked by {by} "
        f"after {rows[0]['retrain_steps']} retraining steps; winner **{rows[0]['name']}**.", "",
        f"| candidate | layers | hidden | {mlp} | heads | groups | params | "
        f"{'active params | ' if moe else ''}one-shot loss | loss after retraining | "
        f"{by + ' | ' if score_fn else ''}rank one-shot | rank retrained |",
        "| --- " * (11 + bool(score_fn) + 2 * moe) + "|",
    ]
    for r in rows:
        s = r["shape"]
        score = f"| {r['score']:.6g} " if score_fn else ""
        width = f"{s['num_moe_experts']} | {s['moe_ffn_hidden_size']}" if moe \
            else str(s["ffn_hidden_size"])
        active = f"| {r['active_params']:,} " if moe else ""
        lines.append(
            f"| {r['name']} | {s['num_layers']} | {s['hidden_size']} | {width} "
            f"| {s['num_attention_heads']} | {s['num_query_groups']} | {r['params']:,} "
            f"{active}| {r['one_shot_loss']:.4f} | {r['retrained_loss']:.4f} {score}"
            f"| {_fmt_rank(r['rank_one_shot'])} | {_fmt_rank(r['rank_retrained'])} |")
    corr = "undefined (fewer than 2 candidates or a constant ranking)" if rho is None \
        else f"{rho:.3f}"
    lines += ["", f"Spearman correlation between the one-shot and retrained rankings: {corr}",
              "", "![validation loss during retraining](loss_curves.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))


def plot_curves(records: list[dict[str, Any]], png: Path) -> None:
    """Validation LM loss against retraining step, one line per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in records:
        steps, losses = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(steps, losses, "o-", markersize=3, label=f"{r['name']} ({r['params']:,})")
    ax.set_xlabel("retraining step")
    ax.set_ylabel("validation LM loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)

"""The comparisons of the method benchmark, one function per published finding
(``docs/method.md``). Each returns a section for the report: the claim, a table,
the verdict (agree / disagree / inconclusive, decided per seed) and the curves to plot.

Lower validation loss is better everywhere. With paired seeds, a claim "A beats B" is *agree*
when A beats B at every seed, *disagree* when B beats A at every seed, *tie* when they are equal
at every seed, else *inconclusive*.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from benchmarks.method.hetero import HeteroSection
from benchmarks.method.moe import MoESection
from benchmarks.method.recovery import RecoverySection
from benchmarks.method.runner import Study
from benchmarks.method.verdicts import Section, mean_spread, verdict
from nemo_minitron.config import ModelConfig
from nemo_minitron.eval.bench import BenchConfig
from nemo_minitron.importance.aggregate import AGGREGATIONS
from nemo_minitron.model.params import count_params
from nemo_minitron.prune.plan import Target, pruned_config


def shapes(study: Study, src: ModelConfig) -> tuple[Target, Target]:
    """``(width, depth)`` targets with (nearly) equal parameter counts."""
    s = study.recipe.study
    layers = s.depth_num_layers or src.num_layers // 2
    want = count_params(pruned_config(src, Target(num_layers=layers)))
    hidden = s.width_hidden_size or 3 * src.hidden_size // 4
    step = s.width_ffn_hidden_size_step
    ffn = min(range(step, src.ffn_hidden_size + 1, step), key=lambda f: abs(count_params(
        pruned_config(src, Target(hidden_size=hidden, ffn_hidden_size=f))) - want))
    return (Target(hidden_size=hidden, ffn_hidden_size=ffn),
            Target(num_layers=layers, layer_metric="lm_loss"))


def _shape(t: Target, src: ModelConfig) -> str:
    return (f"L{t.num_layers or src.num_layers}-H{t.hidden_size or src.hidden_size}"
            f"-F{t.ffn_hidden_size or src.ffn_hidden_size}")


class Experiments(RecoverySection, MoESection, HeteroSection):
    """Builds the sections; units are shared between sections (and cached by name)."""

    def __init__(self, study: Study, src: ModelConfig):
        self.st, self.src = study, src
        self.seeds = study.recipe.study.seeds
        self.width, self.depth = shapes(study, src)

    def W(self, s: int) -> dict[str, Any]:  # noqa: N802 - the width-pruned student
        return self.st.prune(f"width-s{s}", self.width, s)

    def D(self, s: int) -> dict[str, Any]:  # noqa: N802 - the depth-pruned student
        return self.st.prune(f"depth-s{s}", self.depth, s)

    def kd_width(self, s: int) -> dict[str, Any]:
        return self.st.distill(f"kd-width-s{s}", self.W(s)["checkpoint"], s)

    def kd_depth(self, s: int) -> dict[str, Any]:
        return self.st.distill(f"kd-depth-s{s}", self.D(s)["checkpoint"], s)

    def teacher_loss(self) -> float:
        ckpt = self.st.teacher()
        return self.st.unit("teacher-eval", lambda: {"loss": self.st.evaluate(ckpt)})["loss"]

    def losses(self, fn: Any) -> list[float]:
        return [fn(s)["loss"] for s in self.seeds]

    # ------------------------------------------------------------------ sections
    def teacher(self) -> Section:
        st, r = self.st, self.st.recipe
        ckpt, loss = st.teacher(), self.teacher_loss()
        t = r.teacher.train
        trained_here = r.study.teacher is None
        tokens = t.train_iters * t.global_batch_size * self.src.seq_length
        rows = [["checkpoint", ckpt], ["parameters", f"{count_params(self.src):,}"],
                ["shape", f"L{self.src.num_layers}-H{self.src.hidden_size}-"
                          f"F{self.src.ffn_hidden_size}-A{self.src.num_attention_heads}-"
                          f"G{self.src.query_groups}, vocab {self.src.vocab_size}, "
                          f"seq {self.src.seq_length}"],
                ["training tokens", f"{tokens:,} ({t.train_iters} steps x "
                 f"{t.global_batch_size} x {self.src.seq_length})" if trained_here
                 else "given checkpoint (study.teacher)"],
                ["validation loss (fixed set)", f"{loss:.4f}"]]
        curves = {"teacher": st.unit("teacher", lambda: {})["curve"]} if trained_here else {}
        return {"key": "teacher", "title": "Teacher", "claim": None, "header": ["", ""],
                "rows": rows, "verdict": None, "curves": curves, "loss": loss}

    def aggregation(self) -> Section:
        c = self.st.recipe.calib
        grid: dict[tuple[str, str], list[float]] = {}
        for b in AGGREGATIONS:
            for q in AGGREGATIONS:
                if (b, q) == (c.batch_agg, c.seq_agg):
                    grid[b, q] = self.losses(self.W)
                else:
                    grid[b, q] = self.losses(lambda s, b=b, q=q: self.st.prune(
                        f"agg-{b}-{q}-s{s}", self.width, s, batch_agg=b, seq_agg=q))
        best = min(grid, key=lambda k: statistics.fmean(grid[k]))
        mine = statistics.fmean(grid["l2", "mean"])
        others = [statistics.fmean(v) for k, v in grid.items() if k != ("l2", "mean")]
        rank = 1 + sum(x < mine - 1e-6 for x in others)
        ties = sum(abs(x - mine) <= 1e-6 for x in others)
        rows = [[f"batch {b}"] + [mean_spread(grid[b, q]) for q in AGGREGATIONS]
                for b in AGGREGATIONS]
        return {"key": "aggregation", "title": "Aggregation of activations (one-shot)",
                "claim": "L2 over the batch and mean over the sequence is the best aggregation",
                "header": ["", *(f"seq {q}" for q in AGGREGATIONS)], "rows": rows,
                "verdict": "agree" if rank == 1 else "disagree",
                "detail": f"best: batch {best[0]} / seq {best[1]} "
                          f"({statistics.fmean(grid[best]):.4f}); batch l2 / seq mean ranks "
                          f"{rank} of 9 ({mine:.4f})"
                          + (f", tied with {ties} other{'s' * (ties > 1)} (the same units "
                             "kept)" if ties else "")
                          + f". Shape {_shape(self.width, self.src)}.",
                "grid": {f"{b}/{q}": v for (b, q), v in grid.items()}}

    def criteria(self) -> Section:
        act = self.losses(self.W)
        mag = [self.st.prune("magnitude", self.width, self.seeds[0],
                             importance="magnitude")["loss"]]
        rnd = self.losses(lambda s: self.st.prune(f"random-s{s}", self.width, s,
                                                  importance="random"))
        rows = [["activation (calibration set per seed)", mean_spread(act)],
                ["weight magnitude (data-free)", mean_spread(mag)],
                ["random (seed per seed)", mean_spread(rnd)]]
        v_mag, v_rnd = verdict(act, mag), verdict(act, rnd)
        return {"key": "criteria", "title": "Activation importance vs weight magnitude vs random",
                "claim": "activation-based importance prunes better than magnitude and random",
                "header": ["importance", "one-shot validation loss"], "rows": rows,
                "verdict": v_mag if v_mag == v_rnd else f"vs magnitude: {v_mag}; vs random: "
                                                        f"{v_rnd}",
                "detail": f"shape {_shape(self.width, self.src)}"}

    def width_depth(self) -> Section:
        w1, d1 = self.losses(self.W), self.losses(self.D)
        wk, dk = self.losses(self.kd_width), self.losses(self.kd_depth)
        steps = self.st.recipe.retrain.train_iters
        pw, pd = self.W(self.seeds[0])["params"], self.D(self.seeds[0])["params"]
        rows = [[f"width {_shape(self.width, self.src)}", f"{pw:,}", mean_spread(w1),
                 mean_spread(wk)],
                [f"depth {_shape(self.depth, self.src)} (kept layers "
                 f"{self.D(self.seeds[0])['kept_layers']})", f"{pd:,}", mean_spread(d1),
                 mean_spread(dk)]]
        v1, v2 = verdict(d1, w1), verdict(wk, dk)
        return {"key": "width_depth", "title": "Width vs depth pruning at equal parameters",
                "claim": "depth is better one-shot; width is better after retraining",
                "header": ["student", "params", "one-shot loss", f"after {steps} KD steps"],
                "rows": rows, "verdict": f"one-shot: {v1}; after retraining: {v2}",
                "curves": {"width (KD)": self.kd_width(self.seeds[0])["curve"],
                           "depth (KD)": self.kd_depth(self.seeds[0])["curve"]}}

    def kd_vs_ce(self) -> Section:
        def ce_run(s: int) -> dict[str, Any]:
            return self.st.finetune(f"ce-width-s{s}", self.W(s)["checkpoint"], s)

        kd, ce = self.losses(self.kd_width), self.losses(ce_run)
        s0 = self.seeds[0]
        return {"key": "kd_vs_ce", "title": "Distillation vs cross-entropy retraining",
                "claim": "at equal tokens, distillation (logit KL) retrains better than "
                         "cross-entropy on the ground truth",
                "header": ["retraining of the width student", "validation loss"],
                "rows": [["logit KL (KD)", mean_spread(kd)], ["cross-entropy", mean_spread(ce)],
                         ["(the teacher)", f"{self.teacher_loss():.4f}"]],
                "verdict": verdict(kd, ce),
                "detail": self._teacher_cap(kd, ce),
                "curves": {"KD": self.kd_width(s0)["curve"],
                           "cross-entropy": ce_run(s0)["curve"]}}

    def _teacher_cap(self, kd: list[float], ce: list[float]) -> str:
        t = self.teacher_loss()
        text = (f"Against the teacher's own loss {t:.4f}: cross-entropy ends {_below(ce, t)} it, "
                f"distillation {_below(kd, t)} it.")
        if all(x < t for x in ce) and not any(x < t for x in kd):
            text += (" Distillation pulls the student toward the teacher's distribution, so an "
                     "under-trained teacher caps it, while the ground truth does not.")
        return text

    def intermediate(self) -> Section:
        r = self.st.recipe
        kd = dataclasses.replace(r.kd, hidden_weight=r.study.hidden_weight)

        def both_run(s: int) -> dict[str, Any]:
            return self.st.distill(f"kdh-depth-s{s}", self.D(s)["checkpoint"], s, kd=kd)

        logit, both = self.losses(self.kd_depth), self.losses(both_run)
        s0 = self.seeds[0]
        return {"key": "intermediate",
                "title": "Logit-only vs logit + intermediate losses (depth cut in half)",
                "claim": "when depth is cut a lot, adding intermediate hidden-state losses helps",
                "header": ["distillation of the depth student", "validation loss"],
                "rows": [["logit KL only", mean_spread(logit)],
                         [f"logit KL + {kd.hidden_weight} x cosine on mapped layers",
                          mean_spread(both)]],
                "verdict": verdict(both, logit),
                "curves": {"logit only": self.kd_depth(s0)["curve"],
                           "logit + hidden": both_run(s0)["curve"]}}

    def scratch(self) -> Section:
        st, r = self.st, self.st.recipe
        cfg = self._width_config()
        steps, full = r.retrain.train_iters, r.teacher.train.train_iters
        kd = self.losses(self.kd_width)
        eq = self.losses(lambda s: st.scratch(f"scratch-width-s{s}", cfg, steps, s))
        full_runs = [st.scratch(f"scratch-full-width-s{s}", cfg, full, s)
                     for s in self.seeds[:r.study.scratch_full_seeds]]
        tpstep = r.retrain.global_batch_size * cfg.seq_length
        s0 = self.seeds[0]
        target = self.kd_width(s0)["loss"]
        reach = tokens_to_reach(full_runs[0]["curve"], target)
        rows = [["pruned + distilled", f"{steps * tpstep:,}", mean_spread(kd)],
                ["from scratch, same tokens", f"{steps * tpstep:,}", mean_spread(eq)],
                ["from scratch, the teacher's tokens", f"{full * tpstep:,}",
                 mean_spread([x["loss"] for x in full_runs])]]
        detail = (f"From scratch reaches the distilled student's loss {target:.4f} after "
                  f"{reach:,.0f} tokens, {reach / (steps * tpstep):.1f}x the distillation "
                  "budget." if reach is not None else f"From scratch does not reach the "
                  f"distilled student's loss {target:.4f} within {full * tpstep:,} tokens "
                  f"({full / steps:.1f}x the distillation budget).")
        return {"key": "scratch", "title": "Pruned + distilled vs trained from scratch",
                "claim": "pruning + distillation beats training the same architecture from "
                         "scratch, with many times fewer tokens",
                "header": ["width architecture", "training tokens", "validation loss"],
                "rows": rows, "verdict": verdict(kd, eq), "detail": detail,
                "curves": {"pruned + distilled": self.kd_width(s0)["curve"],
                           "scratch (teacher's budget)": full_runs[0]["curve"]}}

    def _width_config(self) -> ModelConfig:
        from nemo_minitron.checkpoint.io import load_model_config

        return load_model_config(self.W(self.seeds[0])["checkpoint"])

    def iterative(self) -> Section:
        n = self.st.recipe.study.iterative_steps
        src, w = self.src, self.width

        def chain(s: int) -> dict[str, Any]:
            ckpt = None
            for k in range(1, n + 1):  # evenly spaced widths, re-estimating every round
                h = src.hidden_size - (src.hidden_size - w.hidden_size) * k // n
                f = src.ffn_hidden_size - (src.ffn_hidden_size - w.ffn_hidden_size) * k // n
                res = self.st.prune(f"iter-width-s{s}-r{k}", Target(hidden_size=h,
                                    ffn_hidden_size=f), s, source=ckpt)
                ckpt = res["checkpoint"]
            return res

        one_it = self.losses(chain)
        kd_it = self.losses(lambda s: self.st.distill(f"kd-iter-width-s{s}",
                                                      chain(s)["checkpoint"], s))
        one, kd = self.losses(self.W), self.losses(self.kd_width)
        v1, v2 = verdict(one_it, one), verdict(kd_it, kd)
        return {"key": "iterative", "title": "Single-shot vs iterative importance",
                "claim": "iterative importance (prune a little, re-estimate, repeat) brings no "
                         "benefit over single shot",
                "header": ["importance", "one-shot loss", "after KD"],
                "rows": [["single shot", mean_spread(one), mean_spread(kd)],
                         [f"iterative, {n} rounds", mean_spread(one_it), mean_spread(kd_it)]],
                "verdict": "disagree" if v2 == "agree" else "agree",
                "detail": f"Is iterative better one-shot: {v1}; after retraining: {v2}. The "
                          "claim holds unless iterative wins after retraining at every seed."}

    def throughput(self) -> Section:
        s0 = self.seeds[0]
        rows = self.st.throughput({"teacher": self.st.teacher(),
                                   "width": self.kd_width(s0)["checkpoint"],
                                   "depth": self.kd_depth(s0)["checkpoint"]})["rows"]
        t = rows[0]["params"]
        table = [[r["label"], f"{r['params'] / t:.2f}", f"{r['prefill_ratio']:.2f}",
                  f"{r['prefill_flop_ratio']:.2f}", f"{r['decode_ratio']:.2f}",
                  f"{r['decode_flop_ratio']:.2f}"] for r in rows]
        width, depth = rows[1], rows[2]
        ok = depth["prefill_ratio"] > width["prefill_ratio"] and \
            depth["decode_ratio"] > width["decode_ratio"]
        return {"key": "throughput", "title": "Inference throughput of the pruned models",
                "claim": "at equal parameters the depth-pruned model is faster than the "
                         "width-pruned one (published: 2.7x vs 1.8x over the 8B teacher)",
                "header": ["model", "params ratio", "prefill speed-up", "FLOP-predicted",
                           "decode speed-up", "FLOP-predicted"],
                "rows": table, "verdict": "agree" if ok else "disagree",
                "detail": _bench_detail(self.st.recipe.throughput)}


def _bench_detail(b: BenchConfig) -> str:
    """How ``eval.bench`` measured: the models in turns or one after another."""
    how = ("the models taking turns in every round, median of the per-round ratios"
           if b.interleave else "one model after the other, median of the per-round ratios")
    return (f"measured in one process, {how} (batch {b.batch_size}, prompt {b.seq_length}, "
            f"{b.decode_tokens} decoded tokens, {b.repeats} rounds after a warm-up)")


def _below(xs: list[float], ref: float) -> str:
    n = sum(x < ref for x in xs)
    return "below" if n == len(xs) else "above" if n == 0 else f"below at {n} of {len(xs)} seeds"


def tokens_to_reach(curve: list[list[float]], loss: float) -> float | None:
    """First token count at which a validation curve reaches ``loss`` (linear between points)."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= loss:
            return t1 if l0 == l1 else t0 + (t1 - t0) * (l0 - loss) / (l0 - l1)
    return None

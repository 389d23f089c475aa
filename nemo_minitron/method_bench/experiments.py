"""The comparisons of the method benchmark, one function per published finding
(``../shared/reference/method.md``). Each returns a section for the report: the claim, a table,
the verdict (agree / disagree / inconclusive, decided per seed) and the curves to plot.

Lower validation loss is better everywhere. With paired seeds, a claim "A beats B" is *agree*
when A beats B at every seed, *disagree* when B beats A at every seed, *tie* when they are equal
at every seed, else *inconclusive*.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.importance.aggregate import AGGREGATIONS
from nemo_minitron.method_bench.runner import Study
from nemo_minitron.model.params import count_params
from nemo_minitron.prune.plan import Target, pruned_config

Section = dict[str, Any]


def mean_spread(xs: list[float], pct: bool = False, digits: int = 4) -> str:
    """``mean ± half-range`` (just the value for one seed) to ``digits`` decimals; ``pct``:
    fractions as percent with one decimal."""
    m, h = statistics.fmean(xs), (max(xs) - min(xs)) / 2
    if pct:
        return f"{100 * m:.1f}%" if len(xs) == 1 else f"{100 * m:.1f}% ± {100 * h:.1f}%"
    return f"{m:.{digits}f}" if len(xs) == 1 else f"{m:.{digits}f} ± {h:.{digits}f}"


def verdict(better: list[float], worse: list[float]) -> str:
    """Does ``better`` (the claimed winner) have the lower loss, seed by seed?"""
    if len(worse) == 1 and len(better) > 1:
        worse = worse * len(better)
    d = [w - b for b, w in zip(better, worse)]
    if all(abs(x) < 1e-6 for x in d):
        return "tie"
    if all(x > 0 for x in d):
        return "agree"
    if all(x < 0 for x in d):
        return "disagree"
    return "inconclusive (the seeds disagree)"


def verdict_higher(better: list[float], worse: list[float]) -> str:
    """``verdict`` for a figure where higher is better (retention, acceptance rate)."""
    return verdict([-x for x in better], [-x for x in worse])


def retention(unpruned_loss: float, loss: float) -> float:
    """Quality retained by a model relative to the unpruned one, from validation losses:
    ``unpruned_loss / loss`` (1.0: as good as the unpruned model; below 1: worse). The loss
    analogue of the published accuracy retention, pruned accuracy / unpruned accuracy."""
    return unpruned_loss / loss


def sdd_num_layers(teacher_layers: int, given: int | None) -> int:
    """Layers of the self-data-distillation student: ``given``, else 80% of the teacher's
    (rounded, at least one fewer than the teacher, at least one)."""
    if teacher_layers < 2:
        raise ConfigError(f"the teacher has {teacher_layers} layer: nothing to depth-prune for "
                          "the sdd, merge and specdec sections")
    if given is not None:
        if given >= teacher_layers:
            raise ConfigError(f"instruct.num_layers={given} must be below the teacher's "
                              f"{teacher_layers} layers")
        return given
    return max(1, min(teacher_layers - 1, round(0.8 * teacher_layers)))


def shapes(study: Study, src: ModelConfig) -> tuple[Target, Target]:
    """``(width, depth)`` targets with (nearly) equal parameter counts."""
    s = study.recipe.study
    layers = s.depth_num_layers or src.num_layers // 2
    want = count_params(pruned_config(src, Target(num_layers=layers)))
    hidden = s.width_hidden_size or 3 * src.hidden_size // 4
    step = s.width_ffn_step
    ffn = min(range(step, src.ffn_hidden_size + 1, step), key=lambda f: abs(count_params(
        pruned_config(src, Target(hidden_size=hidden, ffn_hidden_size=f))) - want))
    return (Target(hidden_size=hidden, ffn_hidden_size=ffn),
            Target(num_layers=layers, layer_metric="lm_loss"))


def _shape(t: Target, src: ModelConfig) -> str:
    return (f"L{t.num_layers or src.num_layers}-H{t.hidden_size or src.hidden_size}"
            f"-F{t.ffn_hidden_size or src.ffn_hidden_size}")


class Experiments:
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
                "detail": f"measured in one process, one after another (batch "
                          f"{self.st.recipe.throughput.batch_size}, prompt "
                          f"{self.st.recipe.throughput.seq_length}, "
                          f"{self.st.recipe.throughput.decode_tokens} decoded tokens, best of "
                          f"{self.st.recipe.throughput.repeats})"}


    # ------------------------------------------------------------------ instruction chain
    # Self-data distillation (arXiv 2410.09982): pretrained teacher -> instruction-tuned
    # teacher -> depth-pruned by angular distance -> fine-tuned on the original answers (SFT)
    # or on the tuned teacher's rewrites of them (SDD), with equal steps.
    def tuned(self) -> dict[str, Any]:
        """The instruction-tuned teacher (one for every seed, as the teacher is)."""
        return self.st.sft("tuned-teacher", self.st.teacher(),
                           self.st.instruct_data()["train"], 0, self.st.recipe.tune)

    def P(self, s: int) -> dict[str, Any]:  # noqa: N802 - the pruned instruction-tuned teacher
        layers = sdd_num_layers(self.src.num_layers, self.st.recipe.instruct.num_layers)
        return self.st.prune(f"sdd-prune-s{s}", Target(num_layers=layers,
                             layer_metric="angular_distance"), s,
                             source=self.tuned()["checkpoint"])

    def rewritten(self, s: int) -> dict[str, Any]:
        return self.st.self_distill(f"rewrite-s{s}", self.tuned()["checkpoint"],
                                    self.P(s)["checkpoint"], s)

    def sft_arm(self, s: int) -> dict[str, Any]:
        return self.st.sft(f"sft-s{s}", self.P(s)["checkpoint"],
                           self.st.instruct_data()["train"], s, self.st.recipe.sft)

    def sdd_arm(self, s: int) -> dict[str, Any]:
        return self.st.sft(f"sdd-s{s}", self.P(s)["checkpoint"], self.rewritten(s)["data"], s,
                           self.st.recipe.sft)

    def scores(self, name: str, unit: dict[str, Any]) -> dict[str, Any]:
        return self.st.instruct_scores(name, unit["checkpoint"])

    def _instruct_rows(self, arms: list[tuple[str, list[dict[str, Any]]]],
                       unpruned: float) -> list[list[str]]:
        """Table rows: task loss, pass rate, general loss, retention of each arm's scores."""
        rows = []
        for label, sc in arms:
            rows.append([label, mean_spread([x["task_loss"] for x in sc]),
                         mean_spread([x["pass_rate"] for x in sc], pct=True),
                         mean_spread([x["loss"] for x in sc]),
                         mean_spread([retention(unpruned, x["loss"]) for x in sc], pct=True)])
        return rows

    def _instruct_desc(self) -> str:
        d, ic = self.st.instruct_data(), self.st.recipe.instruct
        return (f"Task loss: mean loss over the response tokens of {d['eval_examples']} held-out "
                f"instructions (the embedded instruction set: write the standard-library "
                f"function from its signature and docstring; held out by source file). Pass "
                f"rate: share of the greedy answers ({ic.max_new_tokens} new tokens at most) to "
                f"the first {d['gen_prompts']} of them that parse as Python and define the "
                f"asked function. "
                f"Retention = general loss of the unpruned instruction-tuned teacher / general "
                f"loss of the model, the general loss being the fixed pretraining validation "
                f"set's (100%: as good as unpruned; the published retention is the same ratio "
                f"of benchmark accuracies). Training: {d['train_examples']} instructions of "
                f"at most {ic.max_chars} characters that fit {ic.seq_length}-token windows. One "
                f"instruction-tuned teacher serves every seed; a seed moves the pruning "
                f"calibration set, the fine-tuning order and the rewrite sampling.")

    def sdd(self) -> Section:
        r, s0 = self.st.recipe, self.seeds[0]
        tuned = self.scores("tuned-teacher", self.tuned())
        one = [self.scores(f"sdd-prune-s{s}", self.P(s)) for s in self.seeds]
        sft = [self.scores(f"sft-s{s}", self.sft_arm(s)) for s in self.seeds]
        sdd = [self.scores(f"sdd-s{s}", self.sdd_arm(s)) for s in self.seeds]
        u = tuned["loss"]
        layers = sdd_num_layers(self.src.num_layers, r.instruct.num_layers)
        n, steps = self.src.num_layers, r.sft.train_iters
        rows = self._instruct_rows([
            (f"instruction-tuned teacher ({n} layers, unpruned)", [tuned]),
            (f"pruned to {layers} layers by angular distance (kept "
             f"{self.P(s0)['kept_layers']} at the first seed), no fine-tuning", one),
            (f"+ SFT on the original answers ({steps} steps)", sft),
            (f"+ SFT on the self-distilled answers (SDD, {steps} steps)", sdd)], u)
        ret_sdd = [retention(u, x["loss"]) for x in sdd]
        ret_sft = [retention(u, x["loss"]) for x in sft]
        acc = [self.rewritten(s) for s in self.seeds]
        kept = f"{sum(a['kept'] for a in acc)} of {sum(a['examples'] for a in acc)}"
        task = verdict([x["task_loss"] for x in sdd], [x["task_loss"] for x in sft])
        passed = verdict_higher([x["pass_rate"] for x in sdd], [x["pass_rate"] for x in sft])
        return {"key": "sdd", "title": "Self-data distillation vs SFT after depth pruning",
                "claim": "after depth pruning, fine-tuning on the unpruned model's own rewrites "
                         "of the answers (self-data distillation) retains more quality than "
                         "SFT on the original answers (published: 91.2% vs 81.7% average "
                         "accuracy retention, Llama-3.1-8B-Instruct 32 -> 26 layers)",
                "header": ["model", "task loss", "pass rate", "general loss", "retention"],
                "rows": rows, "verdict": verdict_higher(ret_sdd, ret_sft),
                "detail": f"The verdict compares retention. Does SDD also win on the task loss: "
                          f"{task}; on the pass rate: {passed}. The instruction-tuned teacher "
                          f"kept {kept} rewrites (acceptance rate "
                          f"{mean_spread([a['acceptance_rate'] for a in acc], pct=True)}; a "
                          f"rejected rewrite leaves the original answer"
                          + ("; none was kept, so both arms trained on the same data"
                             if not any(a["kept"] for a in acc) else "") + "). "
                          + self._instruct_desc() + " Curves: the training loop's validation "
                          "loss on the held-out instructions.",
                "curves": {"SFT (original answers)": self.sft_arm(s0)["curve"],
                           "SDD (self-distilled answers)": self.sdd_arm(s0)["curve"]}}

    def merge(self) -> Section:
        st, r = self.st, self.st.recipe
        u = self.scores("tuned-teacher", self.tuned())["loss"]

        def parents(s: int) -> tuple[dict[str, Any], dict[str, Any]]:
            a, b = self.rewritten(s)["halves"]
            p = self.P(s)["checkpoint"]
            return (st.sft(f"sdd-half-a-s{s}", p, a, s, r.sft),
                    st.sft(f"sdd-half-b-s{s}", p, b, s, r.sft))

        def merged(s: int) -> dict[str, Any]:
            a, b = parents(s)
            return st.merge(f"merged-s{s}", a["checkpoint"], b["checkpoint"])

        pa = [self.scores(f"sdd-half-a-s{s}", parents(s)[0]) for s in self.seeds]
        pb = [self.scores(f"sdd-half-b-s{s}", parents(s)[1]) for s in self.seeds]
        mg = [self.scores(f"merged-s{s}", merged(s)) for s in self.seeds]
        m = r.merge
        how = f"{m.method.upper()} at t={m.t}" if m.method == "slerp" else m.method
        rows = self._instruct_rows([
            ("SDD student, first half of the instructions", pa),
            ("SDD student, second half", pb), (f"the two merged ({how})", mg)], u)
        ret = {k: [retention(u, x["loss"]) for x in v] for k, v in
               (("a", pa), ("b", pb), ("m", mg))}
        best = [max(a, b) for a, b in zip(ret["a"], ret["b"])]
        mean = [(a + b) / 2 for a, b in zip(ret["a"], ret["b"])]
        task_best = [min(a["task_loss"], b["task_loss"]) for a, b in zip(pa, pb)]
        return {"key": "merge", "title": "Merging self-distilled students",
                "claim": "SLERP-merging students self-distilled on different data improves "
                         "quality retention over each of them",
                "header": ["model", "task loss", "pass rate", "general loss", "retention"],
                "rows": rows, "verdict": verdict_higher(ret["m"], best),
                "detail": f"The verdict compares the merged model's retention with the better "
                          f"parent's. Better than the parents' mean retention: "
                          f"{verdict_higher(ret['m'], mean)}; task loss below the better "
                          f"parent's: {verdict([x['task_loss'] for x in mg], task_best)}. "
                          f"Both parents are the pruned student of the sdd section fine-tuned "
                          f"for {r.sft.train_iters} steps on one half of its self-distilled "
                          f"set each (first and second half in the set's order, so mostly "
                          f"different standard-library modules). " + self._instruct_desc()}

    def specdec(self) -> Section:
        st, r = self.st, self.st.recipe
        target = self.tuned()["checkpoint"]
        drafts = {"pruned, no fine-tuning": ("pruned", self.P),
                  "SFT student": ("sft", self.sft_arm), "SDD student": ("sdd", self.sdd_arm)}
        figs: dict[str, list[dict[str, Any]]] = {}
        for label, (key, fn) in drafts.items():
            figs[label] = [st.specdec(f"specdec-{key}-s{s}", target, fn(s)["checkpoint"])
                           for s in self.seeds]
        ks = r.specdec.draft_tokens
        rows = []
        for label, runs in figs.items():
            for i, k in enumerate(ks):
                col = {name: [x["rows"][i][name] for x in runs] for name in (
                    "acceptance_rate", "mean_acceptance_length", "predicted_speedup",
                    "measured_speedup")}
                rows.append([label, k, mean_spread(col["acceptance_rate"], pct=True),
                             mean_spread(col["mean_acceptance_length"], digits=2),
                             mean_spread(col["predicted_speedup"], digits=2),
                             mean_spread(col["measured_speedup"], digits=2)])
        acc = {label: [x["rows"][0]["acceptance_rate"] for x in runs]
               for label, runs in figs.items()}
        same = all(row["greedy_identical"] for runs in figs.values() for x in runs
                   for row in x["rows"])
        d = st.instruct_data()
        return {"key": "specdec", "title": "Pruned students as speculative-decoding drafts",
                "claim": "as the draft model of the unpruned model, the self-distilled student "
                         "is accepted more often than the SFT student",
                "header": ["draft", "K", "acceptance rate", "mean acceptance length",
                           "predicted speed-up", "measured speed-up"],
                "rows": rows, "verdict": verdict_higher(acc["SDD student"], acc["SFT student"]),
                "detail": f"Target: the instruction-tuned teacher; greedy, "
                          f"{r.instruct.max_new_tokens} new tokens after each of "
                          f"{d['gen_prompts']} held-out instruction prompts; the verdict reads "
                          f"K={ks[0]}. Acceptance rate = accepted / proposed draft tokens; mean "
                          f"acceptance length = 1 + accepted / verification steps; predicted "
                          f"speed-up from the acceptance rate and the measured draft/target "
                          f"step-cost ratio. The speculative output is "
                          f"{'identical' if same else 'NOT identical'} to the target's own "
                          f"greedy output. Measured speed-ups of models this small on CPU "
                          f"say nothing about the published claim (per-step overheads dominate); "
                          f"the acceptance figures are what carries over. The KD-distilled "
                          f"depth student of the other sections is not a draft here: it was "
                          f"never instruction-tuned and its context is the pretraining window."}

def _below(xs: list[float], ref: float) -> str:
    n = sum(x < ref for x in xs)
    return "below" if n == len(xs) else "above" if n == 0 else f"below at {n} of {len(xs)} seeds"


def tokens_to_reach(curve: list[list[float]], loss: float) -> float | None:
    """First token count at which a validation curve reaches ``loss`` (linear between points)."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= loss:
            return t1 if l0 == l1 else t0 + (t1 - t0) * (l0 - loss) / (l0 - l1)
    return None

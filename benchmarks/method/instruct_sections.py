"""The instruction-following sections of the method benchmark (``sdd``, ``merge``,
``specdec``), after self-data distillation (arXiv 2410.09982): pretrained teacher ->
instruction-tuned teacher -> depth-pruned by angular distance -> fine-tuned on the original
answers (SFT) or on the tuned teacher's rewrites of them (SDD), with equal steps; two SDD
students merged; the students as speculative-decoding drafts of the tuned teacher.
"""

from __future__ import annotations

from typing import Any

from benchmarks.method.runner import Study
from benchmarks.method.verdicts import (
    Section,
    mean_spread,
    retention,
    verdict,
    verdict_higher,
)
from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.prune.plan import Target


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


class InstructSections:
    """Mixed into ``experiments.Experiments``; units are cached by name like the others."""

    st: Study
    src: ModelConfig
    seeds: list[int]

    def tuned(self) -> dict[str, Any]:
        """The instruction-tuned teacher (one for every seed, as the teacher is); with
        ``instruct.tune`` false the teacher itself."""
        if not self.st.recipe.instruct.tune:
            return {"checkpoint": self.st.teacher()}
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

    def parents(self, s: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The two SDD students merged: the pruned student fine-tuned on each half of its
        self-distilled set."""
        st, r = self.st, self.st.recipe
        a, b = self.rewritten(s)["halves"]
        p = self.P(s)["checkpoint"]
        return (st.sft(f"sdd-half-a-s{s}", p, a, s, r.sft),
                st.sft(f"sdd-half-b-s{s}", p, b, s, r.sft))

    def merged(self, s: int) -> dict[str, Any]:
        a, b = self.parents(s)
        return self.st.merge(f"merged-s{s}", a["checkpoint"], b["checkpoint"])

    def merge(self) -> Section:
        r = self.st.recipe
        u = self.scores("tuned-teacher", self.tuned())["loss"]
        parents, merged = self.parents, self.merged
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

"""The ``recovery`` section of the method benchmark (issue 30): five ways to recover a
depth-pruned instruction model at equal steps and windows, against one another and the unpruned
(instruction-tuned) teacher: (a) SFT on the original answers, (b) SFT on the teacher's
self-distilled rewrites (SDD, arXiv 2410.09982), (c) KD on instruction data (the teacher's
divergence on the response tokens, ``distill instruct.data``), (d) on-policy distillation (GKD,
Agarwal et al. 2024: ``kd.on_policy``), (e) SLERP of two SDD students (the ``merge`` section's).
"""

from __future__ import annotations

from typing import Any

from benchmarks.method.instruct_sections import InstructSections, sdd_num_layers
from benchmarks.method.runner import _curve
from benchmarks.method.verdicts import Section, mean_spread, retention, verdict, verdict_higher
from nemo_minitron.distill.objective import KDConfig


class RecoverySection(InstructSections):
    """Mixed into ``experiments.Experiments``; units are cached by name like the others."""

    # ------------------------------------------------------------------ units
    def teacher_answers(self) -> dict[str, Any]:
        """The tuned teacher's greedy answers to every held-out instruction
        (``instruct.max_new_tokens`` at most), as ``<out>/instruct/valid_teacher.jsonl``: the
        reference of the loss on the teacher's answers."""
        st = self.st

        def run() -> dict[str, Any]:
            from nemo_minitron.checkpoint.io import load_model
            from nemo_minitron.config import ParallelConfig
            from nemo_minitron.data.instruct import read_jsonl, render_prompt, write_jsonl
            from nemo_minitron.eval.generate import SamplingConfig, generate

            ic = st.recipe.instruct
            examples = read_jsonl(st.instruct_data()["valid"])
            model, _, tok = load_model(self.tuned()["checkpoint"], ParallelConfig())
            prompts = [tok.encode(render_prompt(tok, e.prompt_messages)) for e in examples]
            sampling = SamplingConfig(max_new_tokens=ic.max_new_tokens, greedy=True,
                                      stop_tokens=tok.eos_ids)
            b = st.recipe.rewrite.batch_size
            rows = [row for i in range(0, len(prompts), b)
                    for row in generate(model, prompts[i:i + b], sampling,
                                        vocab_limit=tok.vocab_size)]
            out = st.out / "instruct" / "valid_teacher.jsonl"
            write_jsonl(out, [e.with_response(tok.decode(r).strip())
                              for e, r in zip(examples, rows)])
            # The stop token is not returned: a row this long never stopped.
            return {"data": str(out), "answers": len(rows),
                    "cut": sum(len(r) >= ic.max_new_tokens for r in rows)}
        return st.unit("teacher-answers", run)

    def teacher_answer_loss(self, name: str, unit: dict[str, Any]) -> float:
        """A model's mean loss over the response tokens of the teacher's held-out answers."""
        st, ckpt = self.st, unit["checkpoint"]

        def run() -> dict[str, Any]:
            from nemo_minitron.checkpoint.io import load_model
            from nemo_minitron.config import ParallelConfig

            model, _, tok = load_model(ckpt, ParallelConfig())
            return {"checkpoint": ckpt,
                    "loss": st.response_loss(model, tok, self.teacher_answers()["data"])}
        return st.unit(f"teacher-answer-loss-{name}", run)["loss"]

    def distill_arm(self, name: str, s: int, kd: KDConfig) -> dict[str, Any]:
        """The pruned student distilled from the tuned teacher on the instruction training
        set: the ``sft`` loop (steps, batch, windows, learning rate), one example per window
        as the SFT arms, validated on the held-out instructions."""
        st = self.st

        def run() -> dict[str, Any]:
            from nemo_minitron.distill.instruct import InstructKDConfig
            from nemo_minitron.distill.stage import DistillRecipe, distill
            from nemo_minitron.train.pretrain import completed

            r, d = st.recipe, st.instruct_data()
            seq = r.instruct.seq_length
            recipe = DistillRecipe(
                data=st.data(s), train=st.train(r.sft, s, seq_length=seq), kd=kd,
                instruct=InstructKDConfig(data=d["train"], valid_data=d["valid"], pack=False))
            summary = completed(distill(recipe, self.tuned()["checkpoint"],
                                        self.P(s)["checkpoint"], st.out / "runs" / name))
            return {"checkpoint": summary["final"],
                    "curve": _curve(summary["history"], r.sft.global_batch_size * seq)}
        return st.unit(name, run)

    def ikd_arm(self, s: int) -> dict[str, Any]:
        return self.distill_arm(f"ikd-s{s}", s, self.st.recipe.ikd)

    def onpolicy_arm(self, s: int) -> dict[str, Any]:
        return self.distill_arm(f"onpolicy-s{s}", s, self.st.recipe.onpolicy)

    # ------------------------------------------------------------------ section
    def recovery(self) -> Section:
        st, r = self.st, self.st.recipe
        arms = {"pruned": ("pruned, no fine-tuning", self.P),
                "sft": ("(a) SFT on the original answers", self.sft_arm),
                "sdd": ("(b) SFT on the self-distilled answers (SDD)", self.sdd_arm),
                "ikd": ("(c) KD on instruction data", self.ikd_arm),
                "onpolicy": ("(d) on-policy distillation (GKD)", self.onpolicy_arm),
                "merged": ("(e) SLERP of two SDD students", self.merged)}
        target = self.tuned()
        names = {"pruned": "sdd-prune", "sft": "sft", "sdd": "sdd", "ikd": "ikd",
                 "onpolicy": "onpolicy", "merged": "merged"}
        fig: dict[str, list[dict[str, Any]]] = {}
        for key, (_, fn) in arms.items():
            fig[key] = []
            for s in self.seeds:
                name, unit = f"{names[key]}-s{s}", fn(s)
                sc = dict(self.scores(name, unit), checkpoint=unit["checkpoint"])
                sc["teacher_loss"] = self.teacher_answer_loss(name, unit)
                fig[key].append(sc)
        # The drafts' acceptance (the slowest figure here) only with the specdec section, and
        # after every other figure: a study cut short still has those.
        spec = "specdec" in r.study.sections
        for key, scs in fig.items():
            for s, sc in zip(self.seeds, scs):
                sc["acceptance"] = st.specdec(
                    f"specdec-{key}-s{s}", target["checkpoint"], sc["checkpoint"]
                )["rows"][0]["acceptance_rate"] if spec else None
        t = dict(self.scores("tuned-teacher", target))
        t["teacher_loss"] = self.teacher_answer_loss("tuned-teacher", target)
        u, up = t["loss"], t["pass_rate"]

        def row(label: str, sc: list[dict[str, Any]], acc: bool = True) -> list[str]:
            pr = ([mean_spread([x["pass_rate"] / up for x in sc], pct=True)] if up else ["—"])
            return [label, mean_spread([x["teacher_loss"] for x in sc]),
                    mean_spread([x["task_loss"] for x in sc]),
                    mean_spread([x["pass_rate"] for x in sc], pct=True), *pr,
                    mean_spread([x["loss"] for x in sc]),
                    mean_spread([retention(u, x["loss"]) for x in sc], pct=True),
                    mean_spread([x["acceptance"] for x in sc], pct=True) if acc and spec
                    else "—"]

        n = self.src.num_layers
        layers = sdd_num_layers(n, r.instruct.num_layers)
        rows = [row(f"teacher ({n} layers, unpruned)", [t], acc=False)]
        rows += [row(label if key != "pruned" else f"pruned to {layers} layers, no fine-tuning",
                     fig[key]) for key, (label, _) in arms.items()]
        ret = {k: [retention(u, x["loss"]) for x in v] for k, v in fig.items()}

        def by(metric: str, a: str, b: str) -> str:
            xa, xb = [x[metric] for x in fig[a]], [x[metric] for x in fig[b]]
            if None in xa + xb:
                return "not measured (no specdec section)"
            return verdict(xa, xb) if metric.endswith("loss") else verdict_higher(xa, xb)

        pairs = [("SDD over SFT", "sdd", "sft"), ("KD over SDD", "ikd", "sdd"),
                 ("on-policy over KD", "onpolicy", "ikd"), ("SLERP over SDD", "merged", "sdd")]
        v = "; ".join(f"{label}: {verdict_higher(ret[a], ret[b])}" for label, a, b in pairs)
        other = " ".join(
            f"{label}: loss on the teacher's answers {by('teacher_loss', a, b)}, on the "
            f"original answers {by('task_loss', a, b)}, pass rate {by('pass_rate', a, b)}, "
            f"acceptance {by('acceptance', a, b)}." for label, a, b in pairs)
        return {"key": "recovery", "title": "Recovering the pruned instruction model: five ways",
                "claim": "at equal steps, recovery ranks on-policy distillation above KD on "
                         "instruction data above self-data distillation above SFT (published "
                         "for SDD over SFT: 91.2% vs 81.7% average accuracy retention, "
                         "Llama-3.1-8B-Instruct 32 -> 26 layers; KD and on-policy are not in "
                         "that paper; GKD reports on-policy above supervised KD), and SLERP of "
                         "two SDD students retains more than one",
                "header": ["model", "loss on the teacher's answers",
                           "loss on the original answers", "pass rate",
                           "pass rate / teacher's", "general loss", "retention",
                           f"acceptance as draft (K={r.specdec.draft_tokens[0]})"],
                "rows": rows, "verdict": v,
                "detail": self._recovery_detail(ret, other)}

    def _recovery_detail(self, ret: dict[str, list[float]], other: str) -> str:
        r, d = self.st.recipe, self.st.instruct_data()
        ta, op = self.teacher_answers(), r.onpolicy
        acc = [self.rewritten(s) for s in self.seeds]
        kept = f"{sum(a['kept'] for a in acc)} of {sum(a['examples'] for a in acc)}"
        t = r.sft
        return (f"Each part compares retention, seed by seed. Here SDD retains "
                f"{mean_spread(ret['sdd'], pct=True)} and SFT "
                f"{mean_spread(ret['sft'], pct=True)} (published 91.2% vs 81.7%). The same "
                f"pairs on the other figures (lower loss, higher pass rate and acceptance "
                f"win): {other} Arms (a)-(d) train the pruned student for {t.train_iters} "
                f"steps of {t.global_batch_size} instructions, one per "
                f"{r.instruct.seq_length}-token window, at the same learning rate; (e) merges "
                f"two students of as many steps each, trained on one half of the self-"
                f"distilled set each (so it costs two runs). SDD: the teacher kept {kept} "
                f"rewrites (a rejected rewrite leaves the original answer). KD: "
                f"{r.ikd.divergence} divergence on the response tokens. On-policy: a share "
                f"{op.on_policy.fraction} of the micro-batches answered by the student "
                f"(sampling at temperature {op.on_policy.sampling.temperature}, at most "
                f"{op.on_policy.sampling.max_new_tokens} tokens), {op.divergence} at beta "
                f"{op.beta}: TRL's GKD defaults, between mode-seeking reverse KL and "
                f"mass-covering forward KL, half the micro-batches keeping the reference "
                f"answers. Loss on the teacher's answers: mean loss over the response tokens "
                f"of the teacher's own greedy answers to the {ta['answers']} held-out "
                f"instructions ({ta['cut']} of them cut at {r.instruct.max_new_tokens} "
                f"tokens); on the original answers: the task loss of the sdd section. Pass "
                f"rate / teacher's: the accuracy retention of the paper, on the "
                f"{d['gen_prompts']} greedy answers. Acceptance: greedy speculative decoding "
                f"of the teacher with the model as draft (the specdec section's setting). "
                + self._instruct_desc())

"""The method benchmark's units of work, each one library stage (``pretrain``, ``prune``,
``distill``, ``finetune``; for the instruction chain ``sft``, ``self-distill``, ``merge``,
``specdec``) plus one evaluation on the fixed validation set (``instruct_scores`` adds the
held-out instruction task loss and the verifier's pass rate).

A unit's result is written to ``<out>/units/<name>.json`` when it finishes, and a re-run reuses
it; a unit cut short resumes through the stage's own resume (training runs) or is redone
(prunes). Seed ``s`` moves ``data.seed`` and ``train.seed`` by ``s``: another calibration set and
another training order, while every reported loss is measured on one fixed validation set.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from benchmarks.method.config import MethodBenchRecipe
from nemo_minitron.config import ModelConfig, ParallelConfig, Recipe, TrainConfig
from nemo_minitron.distill.objective import KDConfig
from nemo_minitron.prune.plan import Target
from nemo_minitron.utils.logging import get_logger

log = get_logger("method_bench")


def _curve(history: list[dict[str, Any]], tokens_per_step: int,
           key: str = "lm loss") -> list[list[float]]:
    return [[h["step"] * tokens_per_step, h[key]] for h in history if key in h]


class Study:
    """Runs (or reuses) units under ``out``."""

    def __init__(self, recipe: MethodBenchRecipe, out: str | Path):
        self.recipe = recipe
        self.out = Path(out)
        self.units = self.out / "units"
        self._eval_tokens: torch.Tensor | None = None
        self._teacher: str | None = None

    # ------------------------------------------------------------------ plumbing
    def unit(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``fn()``'s result, computed once: cached in ``units/<name>.json`` with its time."""
        from nemo_minitron.utils.fs import atomic_write_json

        f = self.units / f"{name}.json"
        if f.is_file():
            return json.loads(f.read_text())
        t0 = time.perf_counter()
        result = {"name": name, **fn()}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(f, result)
        log.info("unit %s done in %.0fs", name, result["seconds"])
        return result

    def data(self, seed: int):
        d = self.recipe.teacher.data
        return dataclasses.replace(d, seed=d.seed + seed)

    def train(self, base, seed: int, **changes: Any):
        return dataclasses.replace(base, seed=base.seed + seed, **changes)

    def evaluate(self, checkpoint: str, model: torch.nn.Module | None = None) -> float:
        """LM loss of a checkpoint (or of ``model``, loaded from it) on the fixed validation
        set (the first seed's)."""
        from nemo_minitron.checkpoint.io import load_model, load_model_config
        from nemo_minitron.model.forward import lm_loss
        from nemo_minitron.parallel.runtime import init_distributed

        init_distributed(ParallelConfig())
        if self._eval_tokens is None:  # the teacher's window, whatever model comes first
            self._eval_tokens = self._fixed_eval_set(load_model_config(self.teacher())
                                                     .seq_length)
        if model is None:
            model, _, _ = load_model(checkpoint)
        return lm_loss(model, self._eval_tokens, self.recipe.retrain.micro_batch_size)

    def _fixed_eval_set(self, seq_length: int) -> torch.Tensor:
        from nemo_minitron.checkpoint.io import load_checkpoint_tokenizer
        from nemo_minitron.data.datasets import build_gpt_datasets, sequences
        from nemo_minitron.data.resolve import resolve_data

        n = self.recipe.study.eval_samples
        data = self.data(0)
        prefix, tok = resolve_data(data, load_checkpoint_tokenizer(self.teacher()))
        # The training loop's validation split with the same sizes: the same sequences.
        t = self.recipe.retrain
        splits = build_gpt_datasets(prefix, tok, seq_length=seq_length,
                                    split=data.split, seed=data.seed,
                                    num_samples=(t.train_iters * t.global_batch_size, n, 0))
        return sequences(splits.valid, n)

    # ------------------------------------------------------------------ stages
    def teacher(self) -> str:
        """The teacher checkpoint: given, or pretrained under ``<out>/teacher``."""
        if self._teacher is None:
            given = self.recipe.study.teacher
            self._teacher = given or self.unit("teacher", self._pretrain_teacher)["checkpoint"]
        return self._teacher

    def _pretrain_teacher(self) -> dict[str, Any]:
        from nemo_minitron.train.pretrain import completed, pretrain

        r = self.recipe.teacher
        summary = completed(pretrain(r, self.out / "runs" / "teacher"))
        return {"checkpoint": summary["final"],
                "curve": _curve(summary["history"], r.train.global_batch_size
                                * r.model.seq_length)}

    def prune(self, name: str, target: Target, seed: int, *, source: str | None = None,
              importance: str = "activation", batch_agg: str | None = None,
              seq_agg: str | None = None) -> dict[str, Any]:
        """One-shot prune of ``source`` (default: the teacher) to ``target``."""
        from nemo_minitron.prune.stage import PruneRecipe, prune

        def run() -> dict[str, Any]:
            calib = dataclasses.replace(self.recipe.calib,
                                        batch_agg=batch_agg or self.recipe.calib.batch_agg,
                                        seq_agg=seq_agg or self.recipe.calib.seq_agg)
            out = self.out / "runs" / name
            shutil.rmtree(out, ignore_errors=True)  # a prune cut short is redone
            s = prune(source or self.teacher(), str(out), PruneRecipe(
                target=target, calib=calib, data=self.data(seed), importance=importance,
                importance_seed=seed))
            return {"checkpoint": str(out), "params": s["pruned_params"],
                    "kept_layers": s["kept_layers"], "loss": self.evaluate(str(out))}
        return self.unit(name, run)

    def _trained(self, name: str, summary: dict[str, Any], seq_length: int,
                 gbs: int) -> dict[str, Any]:
        from nemo_minitron.train.pretrain import completed

        completed(summary)  # a run cut short is not a result: stop, resume on the re-run
        return {"checkpoint": summary["final"], "loss": self.evaluate(summary["final"]),
                "curve": _curve(summary["history"], gbs * seq_length)}

    def distill(self, name: str, student: str, seed: int, kd: KDConfig | None = None
                ) -> dict[str, Any]:
        """Distill the teacher into ``student`` for the retraining budget."""
        from nemo_minitron.checkpoint.io import load_model_config
        from nemo_minitron.distill.stage import DistillRecipe, distill

        def run() -> dict[str, Any]:
            r = self.recipe
            recipe = DistillRecipe(data=self.data(seed), train=self.train(r.retrain, seed),
                                   kd=kd or r.kd)
            s = distill(recipe, self.teacher(), student, self.out / "runs" / name)
            return self._trained(name, s, load_model_config(student).seq_length,
                                 r.retrain.global_batch_size)
        return self.unit(name, run)

    def finetune(self, name: str, checkpoint: str, seed: int) -> dict[str, Any]:
        """Cross-entropy retraining of ``checkpoint`` for the retraining budget."""
        from nemo_minitron.checkpoint.io import load_model_config
        from nemo_minitron.train.pretrain import finetune

        def run() -> dict[str, Any]:
            r = self.recipe
            recipe = Recipe(data=self.data(seed), train=self.train(r.retrain, seed))
            s = finetune(recipe, checkpoint, self.out / "runs" / name)
            return self._trained(name, s, load_model_config(checkpoint).seq_length,
                                 r.retrain.global_batch_size)
        return self.unit(name, run)

    def scratch(self, name: str, model: ModelConfig, steps: int, seed: int) -> dict[str, Any]:
        """Pretrain ``model`` from random weights for ``steps`` with the teacher's schedule."""
        from nemo_minitron.train.pretrain import pretrain

        def run() -> dict[str, Any]:
            t = self.recipe.teacher
            r = self.recipe.retrain
            # The teacher's learning-rate schedule, the retraining arms' validation cadence.
            train = self.train(t.train, seed, train_iters=steps, eval_interval=r.eval_interval,
                               eval_iters=r.eval_iters, global_batch_size=r.global_batch_size,
                               micro_batch_size=r.micro_batch_size, save_interval=0)
            recipe = Recipe(model=model, data=self.data(seed), train=train)
            s = pretrain(recipe, self.out / "runs" / name)
            return self._trained(name, s, model.seq_length, r.global_batch_size)
        return self.unit(name, run)

    def throughput(self, checkpoints: dict[str, str]) -> dict[str, Any]:
        """Prefill/decode tokens/s side by side, with ratios to the first (the teacher)."""
        from nemo_minitron.eval.bench import bench

        def run() -> dict[str, Any]:
            rows = bench(list(checkpoints.values()), self.recipe.throughput)
            for label, row in zip(checkpoints, rows):
                row["label"] = label
            return {"rows": rows}
        return self.unit("throughput", run)

    # ------------------------------------------------------------------ instruction chain
    def instruct_data(self) -> dict[str, Any]:
        """The instruction sets of the ``sdd``, ``merge`` and ``specdec`` sections, from the
        embedded instruction set, under ``<out>/instruct``: ``train.jsonl``, ``valid.jsonl``
        (held out: the task loss; its first ``gen_prompts`` are answered greedily) and
        ``prompts.jsonl`` (those prompts rendered, for speculative decoding). Only instructions
        that fit ``instruct.seq_length`` are used (see ``InstructConfig.train_examples``)."""
        def run() -> dict[str, Any]:
            from nemo_minitron.checkpoint.io import load_checkpoint_tokenizer
            from nemo_minitron.config import ConfigError
            from nemo_minitron.data.embedded_instruct import prepare_embedded_instruct
            from nemo_minitron.data.instruct import (
                read_jsonl,
                render_prompt,
                tokenize_example,
                write_jsonl,
            )
            from nemo_minitron.selfdistill.prompt import rewrite_messages
            from nemo_minitron.utils.fs import atomic_write_text

            r, ic = self.recipe, self.recipe.instruct
            train, valid = prepare_embedded_instruct(r.teacher.data, max_chars=ic.max_chars,
                                                     valid_fraction=ic.valid_fraction)
            tok = load_checkpoint_tokenizer(self.teacher())
            seq = ic.seq_length

            def fits(e: Any) -> bool:  # the stages' own limits: SFT window, rewrite, answer
                rw = tok.encode(render_prompt(tok, rewrite_messages(e, r.rewrite.prompt_template)))
                gen = tok.encode(render_prompt(tok, e.prompt_messages))
                return (len(tokenize_example(tok, e).ids) <= seq + 1
                        and len(rw) + r.rewrite.sampling.max_new_tokens <= seq
                        and len(gen) + ic.max_new_tokens <= seq)

            all_train, all_valid = read_jsonl(train), read_jsonl(valid)
            tr = list(islice(filter(fits, all_train), ic.train_examples or None))
            va = list(islice(filter(fits, all_valid), ic.eval_examples))
            if len(tr) < 2 or not va:
                raise ConfigError(f"instruct: {len(tr)} training and {len(va)} held-out "
                                  f"instructions of at most instruct.max_chars={ic.max_chars} "
                                  f"fit instruct.seq_length={seq} with "
                                  "rewrite.sampling.max_new_tokens="
                                  f"{r.rewrite.sampling.max_new_tokens} and "
                                  f"instruct.max_new_tokens={ic.max_new_tokens}; need at least "
                                  "2 and 1")
            gen = va[:ic.gen_prompts]
            d = self.out / "instruct"
            write_jsonl(d / "train.jsonl", tr)
            write_jsonl(d / "valid.jsonl", va)
            atomic_write_text(d / "prompts.jsonl", "".join(
                json.dumps({"prompt": render_prompt(tok, e.prompt_messages)}) + "\n"
                for e in gen))
            return {"train": str(d / "train.jsonl"), "valid": str(d / "valid.jsonl"),
                    "prompts": str(d / "prompts.jsonl"), "train_examples": len(tr),
                    "eval_examples": len(va), "gen_prompts": len(gen),
                    "available": [len(all_train), len(all_valid)]}
        return self.unit("instruct-data", run)

    def sft(self, name: str, checkpoint: str, data: str, seed: int,
            train: TrainConfig) -> dict[str, Any]:
        """Supervised fine-tuning of ``checkpoint`` on the instruction JSONL ``data`` on
        ``instruct.seq_length`` windows, validated on the held-out instructions."""
        def run() -> dict[str, Any]:
            from nemo_minitron.train.pretrain import completed
            from nemo_minitron.train.sft import SFTConfig, SFTRecipe, sft

            seq = self.recipe.instruct.seq_length
            recipe = SFTRecipe(data=self.data(seed),
                               train=self.train(train, seed, seq_length=seq),
                               sft=SFTConfig(valid_data=self.instruct_data()["valid"]))
            s = completed(sft(recipe, checkpoint, data, self.out / "runs" / name))
            return {"checkpoint": s["final"],
                    "curve": _curve(s["history"], train.global_batch_size * seq, "sft loss")}
        return self.unit(name, run)

    def instruct_scores(self, name: str, checkpoint: str) -> dict[str, Any]:
        """A checkpoint's ``loss`` on the fixed (pretraining) validation set, ``task_loss``
        (mean over every response token of the held-out instructions) and ``pass_rate`` (its
        greedy answers to the first ``gen_prompts`` of them that pass the code verifier)."""
        def run() -> dict[str, Any]:
            from nemo_minitron.checkpoint.io import load_model
            from nemo_minitron.data.instruct import read_jsonl, render_prompt
            from nemo_minitron.eval.generate import SamplingConfig, generate
            from nemo_minitron.selfdistill.filters import load_verifier
            from nemo_minitron.selfdistill.prompt import instruction_of

            d, ic = self.instruct_data(), self.recipe.instruct
            model, _, tok = load_model(checkpoint, ParallelConfig())
            loss = self.evaluate(checkpoint, model)
            examples = read_jsonl(d["valid"])
            task = self.response_loss(model, tok, d["valid"])
            gen = examples[:d["gen_prompts"]]
            prompts = [tok.encode(render_prompt(tok, e.prompt_messages)) for e in gen]
            sampling = SamplingConfig(max_new_tokens=ic.max_new_tokens, greedy=True,
                                      stop_tokens=tok.eos_ids)
            b = self.recipe.rewrite.batch_size
            answers = [tok.decode(row).strip() for i in range(0, len(prompts), b)
                       for row in generate(model, prompts[i:i + b], sampling,
                                           vocab_limit=tok.vocab_size)]
            verify = load_verifier("code")  # the embedded set's: it defines the function
            passed = sum(verify(instruction_of(e), e.response, a) for e, a in zip(gen, answers))
            return {"checkpoint": checkpoint, "loss": loss, "task_loss": task,
                    "pass_rate": passed / len(gen), "passed": passed, "answered": len(gen)}
        return self.unit(f"scores-{name}", run)

    def response_loss(self, model: torch.nn.Module, tok: Any, data: str) -> float:
        """Mean loss of ``model`` over every response token of the instruction JSONL ``data``
        (one padded ``instruct.seq_length`` window per example, as the SFT loop validates)."""
        import math

        from nemo_minitron.data.instruct import build_sft_dataset, read_jsonl
        from nemo_minitron.model.forward import forward_pass
        from nemo_minitron.train.objectives import masked_mean

        ds = build_sft_dataset(read_jsonl(data), tok, self.recipe.instruct.seq_length,
                               pack=False, name=data)
        rows = [ds[i] for i in range(len(ds))]
        tokens, labels, mask = (torch.stack([r[k] for r in rows])
                                for k in ("tokens", "labels", "loss_mask"))
        mbs = math.gcd(len(rows), self.recipe.retrain.micro_batch_size)
        per_token = torch.cat(forward_pass(model, tokens, labels=labels, micro_batch_size=mbs,
                                           collect=lambda o: o.float().cpu()))
        return float(masked_mean(per_token, mask))

    def self_distill(self, name: str, teacher: str, student: str, seed: int) -> dict[str, Any]:
        """``teacher`` rewrites the answers of the instruction training set (``rewrite``, its
        seed moved by ``seed``); also writes the two halves of the result (first and second
        half in the set's order, so mostly different source modules) for the merge parents."""
        def run() -> dict[str, Any]:
            from nemo_minitron.data.instruct import read_jsonl, write_jsonl
            from nemo_minitron.selfdistill.stage import self_distill, stats_path

            rw = self.recipe.rewrite
            cfg = dataclasses.replace(rw, sampling=dataclasses.replace(
                rw.sampling, seed=rw.sampling.seed + seed), stats=None)
            out = self.out / "runs" / name / "train.jsonl"
            stats_file = stats_path(out, cfg)
            if out.is_file():  # finished, the unit not yet recorded
                stats = json.loads(stats_file.read_text())
            else:
                stats_file.unlink(missing_ok=True)  # written just before OUT: redo the merge
                out.parent.mkdir(parents=True, exist_ok=True)
                stats = self_distill(teacher, self.instruct_data()["train"], str(out), cfg,
                                     student=student)
            examples = read_jsonl(out)
            half = len(examples) // 2
            halves = [out.with_name("half_a.jsonl"), out.with_name("half_b.jsonl")]
            write_jsonl(halves[0], examples[:half])
            write_jsonl(halves[1], examples[half:])
            return {"data": str(out), "halves": [str(h) for h in halves],
                    **{k: stats[k] for k in ("examples", "kept", "acceptance_rate",
                                             "rejected_by_reason")}}
        return self.unit(name, run)

    def merge(self, name: str, base: str, other: str) -> dict[str, Any]:
        """``base`` and ``other`` merged (``recipe.merge``, default SLERP at t=0.5)."""
        def run() -> dict[str, Any]:
            from nemo_minitron.merge.run import merge_checkpoints as merge

            out = self.out / "runs" / name
            shutil.rmtree(out, ignore_errors=True)  # a merge cut short is redone
            merge(base, [other], out, self.recipe.merge)
            return {"checkpoint": str(out)}
        return self.unit(name, run)

    def specdec(self, name: str, target: str, draft: str) -> dict[str, Any]:
        """Speculative decoding of ``target`` with ``draft`` on the held-out prompts, greedy,
        one row per K of ``recipe.specdec.draft_tokens``."""
        def run() -> dict[str, Any]:
            from nemo_minitron.eval.generate import SamplingConfig
            from nemo_minitron.eval.specdec_run import specdec

            d = self.instruct_data()
            sampling = SamplingConfig(max_new_tokens=self.recipe.instruct.max_new_tokens,
                                      greedy=True)
            rows = specdec(target, draft, d["prompts"], None, sampling, self.recipe.specdec,
                           num_prompts=d["gen_prompts"])
            return {"rows": rows}
        return self.unit(name, run)

"""The method benchmark's units of work, each one library stage (``pretrain``, ``prune``,
``distill``, ``finetune``) plus one evaluation on the fixed validation set.

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
from pathlib import Path
from typing import Any

import torch

from nemo_minitron.config import ModelConfig, ParallelConfig, Recipe
from nemo_minitron.distill.objective import KDConfig
from nemo_minitron.method_bench.config import MethodBenchRecipe
from nemo_minitron.prune.plan import Target
from nemo_minitron.utils.logging import get_logger

log = get_logger("method_bench")


def _curve(history: list[dict[str, Any]], tokens_per_step: int) -> list[list[float]]:
    return [[h["step"] * tokens_per_step, h["lm loss"]] for h in history if "lm loss" in h]


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

    def evaluate(self, checkpoint: str) -> float:
        """LM loss of a checkpoint on the fixed validation set (the first seed's)."""
        from nemo_minitron.checkpoint.io import load_model, load_model_config
        from nemo_minitron.model.forward import lm_loss
        from nemo_minitron.parallel.runtime import init_distributed

        init_distributed(ParallelConfig())
        if self._eval_tokens is None:
            self._eval_tokens = self._fixed_eval_set(load_model_config(checkpoint).seq_length)
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
        from nemo_minitron.train.pretrain import pretrain

        r = self.recipe.teacher
        summary = pretrain(r, self.out / "runs" / "teacher")
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

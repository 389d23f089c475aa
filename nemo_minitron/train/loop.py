"""The one training loop (pretraining, fine-tuning and distillation).

Per step: Megatron's pipeline schedule (``get_forward_backward_func``) runs the objective's
forward/backward over the step's micro-batches; Megatron's DDP reduces gradients across data
parallel ranks (``finalize_model_grads``); the optimizer clips and steps; the scheduler moves
the LR. The loop logs loss, tokens/s and ETA, writes TensorBoard scalars and ``metrics.jsonl``,
validates periodically, checkpoints every ``save_interval`` steps, at the end, and on
SIGTERM/SIGUSR1/SIGINT (also when sent to the whole process group), and resumes exactly from
its latest checkpoint.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_minitron.checkpoint import io as ckpt
from nemo_minitron.config import ConfigError, ModelConfig, Recipe, to_dict
from nemo_minitron.data.datasets import micro_batches
from nemo_minitron.data.tokenizer import Tokenizer
from nemo_minitron.parallel.runtime import Runtime
from nemo_minitron.train.objectives import Objective
from nemo_minitron.train.preflight import check_run_dir
from nemo_minitron.utils.fs import repair_jsonl
from nemo_minitron.utils.logging import fmt_duration, get_logger, warn_once

log = get_logger("train")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


def validation_samples(train: Any, dataset_len: int) -> int:
    """Distinct validation samples a run reads: ``evaluate`` takes the same first
    ``eval_iters x global_batch_size`` samples at every validation (fewer when the set is
    smaller); none when the run does not validate. ``train``: a ``TrainConfig``."""
    if not train.eval_interval or not train.eval_iters:
        return 0
    return min(dataset_len, train.eval_iters * train.global_batch_size)


@dataclass
class TrainState:
    """Counters saved in every checkpoint."""

    step: int = 0
    """Optimizer steps done."""
    consumed_samples: int = 0
    """Training sequences consumed (the data position)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Validation results so far."""


class _Signals:
    """Turns SIGTERM/SIGUSR1/SIGINT into a flag that the loop checks once per step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in ckpt.STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_sequence_parallel(model_cfg: ModelConfig, tp: int, config: Any,
                             seq_length: int | None) -> None:
    """One-line errors for a model this loop cannot train under TP=``tp``: an MoE model built
    without sequence parallelism (megatron-core's MoE layer refuses it), or a sequence length
    its sequence parallelism cannot split evenly."""
    if model_cfg.is_moe and tp > 1 and not config.sequence_parallel:
        raise ConfigError(f"parallel.tensor_model_parallel_size={tp}: training an MoE model "
                          "under tensor parallelism needs sequence parallelism; build it with "
                          "build_model(..., sequence_parallel=True) (its norms support it)")
    seq = seq_length or model_cfg.seq_length
    if config.sequence_parallel and seq % tp:
        raise ConfigError(f"train.seq_length={seq}: must be a multiple of "
                          f"parallel.tensor_model_parallel_size={tp} (sequence parallelism "
                          "splits each sequence across the tensor-parallel ranks)")


class Trainer:
    """Runs ``recipe.train`` on an already built, DDP-wrapped model."""

    def __init__(self, *, recipe: Recipe, runtime: Runtime, model: torch.nn.Module,
                 model_cfg: ModelConfig, tokenizer: Tokenizer | None, objective: Objective,
                 optimizer: Any, scheduler: Any, train_ds: Any, valid_ds: Any,
                 out_dir: str | Path):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.recipe, self.rt, self.model = recipe, runtime, model
        self.model_cfg, self.tokenizer, self.objective = model_cfg, tokenizer, objective
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_ds, self.valid_ds = train_ds, valid_ds
        self.out_dir = Path(out_dir)
        self.cfg = recipe.train
        _check_sequence_parallel(model_cfg, runtime.tp, model.config, self.cfg.seq_length)
        self.state = TrainState()
        self.fwd_bwd = get_forward_backward_func()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        config = model.config
        config.no_sync_func = model.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        self.num_microbatches = self.cfg.global_batch_size // (
            self.cfg.micro_batch_size * runtime.dp)
        self._tb = None
        self._metrics_file = self.out_dir / "metrics.jsonl"

    # ------------------------------------------------------------------ metrics plumbing
    def _reduce_metrics(self, results: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Mean over micro-batches (last stage), then over DP; known on every rank."""
        names = self.objective.metric_names
        vec = torch.zeros(len(names), dtype=torch.float64, device=self.rt.device)
        if self.is_last_stage and results:
            for i, name in enumerate(names):
                vec[i] = torch.stack([r[name].double() for r in results]).mean()
        # Losses an objective computes on earlier stages (e.g. distillation of their layers).
        for name, value in self.objective.pop_stage_metrics().items():
            vec[names.index(name)] += value
        dist.all_reduce(vec, group=self.pp_group)
        dist.all_reduce(vec, group=self.dp_group)
        vec /= self.rt.dp
        return {n: float(v) for n, v in zip(names, vec.tolist())}

    def _emit(self, record: dict[str, Any]) -> None:
        if self.rt.rank != 0:
            return
        with open(self._metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, int | float):
                    self._tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    # ------------------------------------------------------------------ steps
    def _run_batches(self, dataset: Any, consumed: int, forward_only: bool) -> list[dict]:
        it = micro_batches(dataset, consumed_samples=consumed,
                           global_batch_size=self.cfg.global_batch_size,
                           micro_batch_size=self.cfg.micro_batch_size, dp_rank=self.dp_rank,
                           dp_size=self.rt.dp)
        # An objective whose stages exchange more than the model's hidden state (distillation
        # sends the teacher's too) resizes the pipeline's tensors.
        extra = {"adjust_tensor_shapes_fn": self.objective.adjust_tensor_shapes} \
            if self.pp > 1 else {}
        return self.fwd_bwd(
            forward_step_func=self.objective.forward_step, data_iterator=it, model=[self.model],
            num_microbatches=self.num_microbatches, seq_length=self.model_cfg.seq_length,
            micro_batch_size=self.cfg.micro_batch_size, forward_only=forward_only, **extra,
        )

    def train_step(self) -> dict[str, float]:
        """One optimizer step; raises ``TrainingError`` on a non-finite loss (no update)."""
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        results = self._run_batches(self.train_ds, self.state.consumed_samples, False)
        metrics = self._reduce_metrics(results)
        if self.model_cfg.is_moe:  # already in the gradient; logged as Megatron-LM does
            from nemo_minitron.model.moe import router_loss_metrics

            metrics.update(router_loss_metrics(self.model_cfg.num_layers, self.num_microbatches))
        step = self.state.step + 1
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise TrainingError(f"{bad[0]} is {metrics[bad[0]]} at step {step}; "
                                "stopping without updating or saving")
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise TrainingError(f"optimizer step failed at step {step} (non-finite gradients)")
        self.scheduler.step(increment=1)
        self.state.step = step
        self.state.consumed_samples += self.cfg.global_batch_size
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation metrics over ``eval_iters`` fixed global batches (the samples of
        ``validation_samples``)."""
        self.model.eval()
        totals: dict[str, float] = {}
        for i in range(self.cfg.eval_iters):
            m = self._reduce_metrics(self._run_batches(
                self.valid_ds, i * self.cfg.global_batch_size, True))
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + v / self.cfg.eval_iters
        self.model.train()
        return totals

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Checkpoint to ``<out>/checkpoints/step_<N>``."""
        path = ckpt.step_dir(self.out_dir, self.state.step)
        state = {"step": self.state.step, "consumed_samples": self.state.consumed_samples,
                 "history": self.state.history, "recipe": to_dict(self.recipe)}
        return ckpt.save_checkpoint(path, self.model, model_cfg=self.model_cfg,
                                    tokenizer=self.tokenizer, optimizer=self.optimizer,
                                    scheduler=self.scheduler, train_state=state, overwrite=True)

    def maybe_resume(self, latest: Path | None) -> bool:
        """Resume from ``latest``, the latest complete checkpoint under ``<out>/checkpoints``
        that matches its checksums."""
        if latest is None:
            return False
        ckpt.load_weights(latest, self.model)
        state = ckpt.load_training_state(latest, self.model, self.optimizer, self.scheduler)
        self.state = TrainState(step=state["step"], consumed_samples=state["consumed_samples"],
                                history=state.get("history", []))
        log.info("resumed from %s (step %d, %d samples)", latest, self.state.step,
                 self.state.consumed_samples)
        if self.cfg.train_iters < self.state.step:
            warn_once(log, f"train.train_iters={self.cfg.train_iters} is below step "
                      f"{self.state.step}, where this run resumes from {latest}: there is "
                      f"nothing left to train")
        return True

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Train to ``train_iters`` (or until a signal / ``exit_interval``); returns a summary
        with the last validation metrics and ``interrupted``."""
        cfg = self.cfg
        latest = ckpt.latest_verified_checkpoint(self.out_dir)
        # Before anything is written; with no intact checkpoint the run starts afresh.
        check_run_dir(self.out_dir, self.model_cfg if latest else None, latest)
        if self.rt.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if repair_jsonl(self._metrics_file):
                log.warning("%s ended in a torn line (a crash mid-write); cut it",
                            self._metrics_file)
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        resumed = self.maybe_resume(latest)
        if not resumed and cfg.eval_interval:
            self._validate()
        tokens_per_step = cfg.global_batch_size * self.model_cfg.seq_length
        start_step, t0 = self.state.step, time.perf_counter()
        window_t, window_steps = time.perf_counter(), 0
        interrupted = False
        with _Signals() as signals:
            while self.state.step < cfg.train_iters:
                metrics = self.train_step()
                window_steps += 1
                step = self.state.step
                self._emit({"kind": "train", "step": step, **metrics})
                if step % cfg.log_interval == 0 or step == cfg.train_iters:
                    now = time.perf_counter()
                    dt = (now - window_t) / window_steps
                    eta = (cfg.train_iters - step) * (now - t0) / (step - start_step)
                    loss_str = " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                        if k not in ("lr", "grad_norm"))
                    log.info("step %d/%d %s lr=%.3g grad_norm=%.3f %.0f tokens/s eta %s", step,
                             cfg.train_iters, loss_str, metrics["lr"], metrics["grad_norm"],
                             tokens_per_step / dt, fmt_duration(eta))
                    self._emit({"kind": "speed", "step": step,
                                "tokens_per_s": tokens_per_step / dt})
                    window_t, window_steps = now, 0
                if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.train_iters):
                    self._validate()
                stop = self._agree(signals.received is not None or
                                   (cfg.exit_interval > 0 and step % cfg.exit_interval == 0
                                    and step < cfg.train_iters))
                if stop or (cfg.save_interval and step % cfg.save_interval == 0) \
                        or step == cfg.train_iters:
                    self.save()
                if stop:
                    log.info("stopping at step %d (%s); resume by running the same command",
                             step, "signal" if signals.received else "exit_interval")
                    interrupted = True
                    break
        if self._tb is not None:
            self._tb.close()
        if self.rt.rank == 0:
            from nemo_minitron.utils.plots import plot_loss_curves

            plot_loss_curves(self._metrics_file, self.out_dir / "loss.png")
        last = self.state.history[-1] if self.state.history else {}
        return {"step": self.state.step, "interrupted": interrupted, "valid": last,
                "history": self.state.history}

    def _validate(self) -> None:
        metrics = self.evaluate()
        self.state.history.append({"step": self.state.step, **metrics})
        self._emit({"kind": "valid", "step": self.state.step, **metrics})
        log.info("validation at step %d: %s", self.state.step,
                 " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def _agree(self, flag: bool) -> bool:
        """All ranks stop together if any rank got a signal."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


"""Can a training run start here? Checked by the training verbs before anything is built:
``check_run_dir`` (the output directory, and a run of another model shape in it) and
``check_fits`` (memory), so that the answer is one line, not a traceback after the data and
model are built.

``check_fits``: sizes that pass validation but cannot be allocated (``model.hidden_size=10**12``,
``train.train_iters=10**12``) are refused with how much they would need.

- The model, per process: ``model.memory.memory_gib`` (weights, gradients, Adam state, the
  activations of a micro-batch, logits, frozen models such as a teacher; written for bf16 on
  GPU), against the GPU's memory. On CPU the weights are fp32, which costs about as many bytes
  per parameter as bf16 weights with fp32 gradients (16 vs 18 with Adam), so the same estimate
  is used without its CUDA reserve, times the processes on this machine, against its memory.
- Megatron's GPT dataset index, in host memory: a sample index (two int64) and a shuffle index
  (one int64) per sample, for ``train_iters x global_batch_size`` training and
  ``eval_iters x global_batch_size`` validation samples (the document index comes on top).

The estimates are rough, so only a run that needs more than the machine's whole memory is
refused.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nemo_minitron.config import ConfigError, ModelConfig, Recipe

INDEX_BYTES_PER_SAMPLE = 3 * 8
"""Megatron's sample index (document, offset) and shuffle index entry of one sample, int64."""


def check_run_dir(run_dir: str | os.PathLike[str], cfg: ModelConfig | None = None,
                  latest: Path | None = None, flag: str = "--out") -> None:
    """Before a run builds anything in ``run_dir``: one-line error if it is not a directory, or
    if its checkpoint ``latest`` (default: its newest) holds a model of another shape than
    ``cfg`` (fields that ``cfg`` leaves unset are not compared). Megatron itself would report
    one mismatched tensor, after the model and data are built."""
    from nemo_minitron.checkpoint.io import latest_checkpoint, load_model_config
    from nemo_minitron.model.params import weight_shape

    d = Path(run_dir)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{flag}={str(run_dir)!r} is a file, not a directory for the run")
    latest = latest or latest_checkpoint(d)
    if cfg is None or latest is None:
        return
    try:
        have, want = weight_shape(load_model_config(latest)), weight_shape(cfg)
    except ConfigError:  # damaged: the run itself skips it for an intact one, checked then
        return
    if any(v is not None and have[k] != v for k, v in want.items()):
        def show(shape: dict[str, Any]) -> str:  # the main axes, and any other that differs
            return " ".join(f"{k}={v}" for i, (k, v) in enumerate(shape.items())
                            if v is not None and (i < 7 or have[k] != want[k]))
        raise ConfigError(f"{flag}={str(run_dir)!r} holds a run of another model shape: its "
                          f"checkpoint {latest.name} has {show(have)}, this run's model "
                          f"{show(want)}; resume it with its own recipe or give a new {flag}")


def host_memory_gib() -> float:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3


def check_fits(recipe: Recipe, model_cfg: ModelConfig,
               frozen: Sequence[ModelConfig] = ()) -> None:
    """One-line error unless training ``model_cfg`` under ``recipe`` (``frozen``: models it
    also runs, e.g. a teacher) fits this machine, as estimated above."""
    from nemo_minitron.model.memory import RESERVE_GIB, GiB, memory_gib
    from nemo_minitron.model.params import count_params
    from nemo_minitron.parallel.runtime import env_rank_world, use_gpu

    p, t = recipe.parallel, recipe.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    _, world, local_rank = env_rank_world()
    host = host_memory_gib()
    samples = (t.train_iters + t.eval_iters) * t.global_batch_size
    index = samples * INDEX_BYTES_PER_SAMPLE / GiB
    if index > host:
        raise ConfigError(f"train.train_iters={t.train_iters} x train.global_batch_size="
                          f"{t.global_batch_size} samples (and train.eval_iters x that batch "
                          f"for validation) need a dataset index of about {_gib(index)}; this "
                          f"machine has {_gib(host)}")
    tokens = recipe.data.tokenizer_vocab_size
    m, *others = (dataclasses.replace(x, vocab_size=x.vocab_size or x.padded_vocab_size(tokens))
                  for x in [model_cfg.with_seq_length(t.seq_length), *frozen])
    need = memory_gib(m, tp, pp, max(1, world // (tp * pp)), t.micro_batch_size, frozen=others)
    if use_gpu():
        import torch

        device = local_rank % torch.cuda.device_count()  # as init_distributed picks it
        have, where = torch.cuda.get_device_properties(device).total_memory / GiB, "GPU"
    else:
        need = (need - RESERVE_GIB) * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        have, where = host, "machine"
    if need > have:
        raise ConfigError(f"the model ({count_params(m):.3g} parameters) needs about "
                          f"{_gib(need)} for weights, gradients, optimizer state and "
                          f"activations (TP={tp} PP={pp}, micro batch {t.micro_batch_size}); "
                          f"this {where} has {_gib(have)}")


def _gib(x: float) -> str:
    return f"{x:,.0f} GiB" if x < 1e9 else f"{x:.3g} GiB"

"""Checkpoints: one directory per checkpoint, reshardable across TP/PP layouts.

Layout::

    <ckpt>/
      model_config.yaml   ModelConfig (Megatron field names); enough to rebuild the model
      tokenizer/          the tokenizer files (tokenizer.model or a Hugging Face directory)
      weights/            model weights, Megatron distributed checkpoint (torch_dist)
      optimizer/          optimizer state, distributed checkpoint (training checkpoints only)
      train_state.json    step, consumed samples, LR-scheduler state, the recipe
      metadata.json       what later stages need from the stage that wrote it (optional;
                          e.g. ``pruning``: kept layers, source shape, importance method)
      rng/rank_*.pt       per-rank RNG states (tensors only: loaded with weights_only=True)

Saving is atomic: every rank writes into ``<ckpt>.tmp``, then rank 0 renames it. A directory
without ``model_config.yaml`` renamed into place is never a checkpoint we wrote.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from nemo_minitron.config import ConfigError, ModelConfig, ParallelConfig, from_dict, to_dict
from nemo_minitron.data.tokenizer import Tokenizer, load_tokenizer
from nemo_minitron.model.build import unwrap
from nemo_minitron.utils.fs import atomic_write_json, atomic_write_text, replace_dir
from nemo_minitron.utils.logging import get_logger
from nemo_minitron.utils.rank import global_rank

log = get_logger("checkpoint")

MODEL_CONFIG = "model_config.yaml"
METADATA = "metadata.json"
CHECKPOINTS = "checkpoints"
"""Training checkpoints of a run live in ``<run_dir>/checkpoints/step_<NNNNNNN>``."""


def step_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """The checkpoint directory of training step ``step`` in a run directory."""
    return Path(run_dir) / CHECKPOINTS / f"step_{int(step):07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A complete checkpoint directory."""
    p = Path(path)
    return (p / MODEL_CONFIG).is_file() and (p / "weights").is_dir()


def check_checkpoint(path: str | os.PathLike[str], field: str = "checkpoint") -> Path:
    """One-line error unless ``path`` is a complete checkpoint."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{field}={str(path)!r} does not exist")
    if not is_checkpoint(p):
        raise ConfigError(f"{field}={str(path)!r} is not a nemo_minitron checkpoint "
                          f"(no {MODEL_CONFIG} and weights/)")
    return p


def load_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The ``ModelConfig`` stored in a checkpoint."""
    p = check_checkpoint(path)
    return from_dict(ModelConfig, yaml.safe_load((p / MODEL_CONFIG).read_text()), "model.")


def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata a checkpoint was saved with (``{}`` when it has none)."""
    f = check_checkpoint(path) / METADATA
    if not f.is_file():
        return {}
    meta = json.loads(f.read_text())
    if not isinstance(meta, dict):
        raise ConfigError(f"{f} does not hold a JSON object")
    return meta


def load_checkpoint_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer stored in a checkpoint."""
    return load_tokenizer(check_checkpoint(path) / "tokenizer")


def load_model(path: str | os.PathLike[str], parallel: ParallelConfig | None = None, *,
               bf16: bool = False, field: str = "checkpoint"
               ) -> tuple[torch.nn.Module, ModelConfig, Tokenizer]:
    """Load a checkpoint into a fresh model: ``(model, its ModelConfig, its tokenizer)``.

    With ``parallel`` the process group and parallel state are started (or kept) for that
    layout first; without it the model is built under the current parallel state. Either way
    the weights are resharded to the layout on load."""
    from nemo_minitron.model.build import build_model

    p = check_checkpoint(path, field)
    cfg = load_model_config(p)
    if parallel is not None:
        from nemo_minitron.parallel.runtime import init_distributed

        init_distributed(parallel)
    model = build_model(cfg, bf16=bf16)
    load_weights(p, model)
    return model, cfg, load_checkpoint_tokenizer(p)


def _model_sharded_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    return unwrap(model).sharded_state_dict()


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module, *,
                    model_cfg: ModelConfig, tokenizer: Tokenizer | None,
                    optimizer: Any = None, scheduler: Any = None,
                    train_state: dict[str, Any] | None = None, overwrite: bool = False,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Collectively save a checkpoint (every rank calls this); ``metadata`` (JSON) is read
    back by ``load_metadata``."""
    from megatron.core import dist_checkpointing

    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if global_rank() == 0:
        if final.exists() and not overwrite:
            raise FileExistsError(f"checkpoint {final} already exists")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "weights").mkdir(parents=True)
        if optimizer is not None:
            (tmp / "optimizer").mkdir()
        (tmp / "rng").mkdir()
    _barrier()
    model_sd = _model_sharded_state_dict(model)
    dist_checkpointing.save(model_sd, str(tmp / "weights"))
    if optimizer is not None:
        opt_sd = optimizer.sharded_state_dict(_model_sharded_state_dict(model))
        dist_checkpointing.save(opt_sd, str(tmp / "optimizer"))
    torch.save(get_rng_state(), tmp / "rng" / f"rank_{global_rank():05d}.pt")
    _barrier()
    if global_rank() == 0:
        atomic_write_text(tmp / MODEL_CONFIG, yaml.safe_dump(to_dict(model_cfg), sort_keys=False))
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        state = dict(train_state or {})
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        atomic_write_json(tmp / "train_state.json", state)
        if metadata is not None:
            atomic_write_json(tmp / METADATA, metadata)
        replace_dir(tmp, final, overwrite=True)  # existence was refused above unless overwrite
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def load_weights(path: str | os.PathLike[str], model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into ``model`` (any TP/PP layout: resharded on load)."""
    from megatron.core import dist_checkpointing

    p = check_checkpoint(path)
    inner = unwrap(model)
    state = dist_checkpointing.load(inner.sharded_state_dict(), str(p / "weights"))
    missing, unexpected = inner.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing:
        raise ConfigError(f"checkpoint {str(path)!r} lacks weights for {missing[:3]}"
                          f"{' ...' if len(missing) > 3 else ''}")


def load_training_state(path: str | os.PathLike[str], model: torch.nn.Module, optimizer: Any,
                        scheduler: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler and this rank's RNG; return the train state."""
    from megatron.core import dist_checkpointing

    p = check_checkpoint(path)
    if optimizer is not None:
        if not (p / "optimizer").is_dir():
            raise ConfigError(f"checkpoint {str(path)!r} holds no optimizer state to resume from")
        opt_sd = optimizer.sharded_state_dict(_model_sharded_state_dict(model), is_loading=True)
        optimizer.load_state_dict(dist_checkpointing.load(opt_sd, str(p / "optimizer")))
    state = json.loads((p / "train_state.json").read_text())
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    rng_file = p / "rng" / f"rank_{global_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and Megatron tracker RNG states of this rank."""
    from megatron.core import tensor_parallel

    np_state = np.random.get_state()
    _, py_state, gauss = random.getstate()
    return {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": torch.tensor(float("nan") if gauss is None else gauss, dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``get_rng_state``."""
    from megatron.core import tensor_parallel

    gauss = float(state["python_gauss"])
    random.setstate((3, tuple(int(x) for x in state["python"]), None if gauss != gauss else gauss))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete ``<run_dir>/checkpoints/step_*`` checkpoint, if any."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if not p.name.endswith((".tmp", ".old"))
                  and is_checkpoint(p))
    return done[-1] if done else None

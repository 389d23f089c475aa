"""Checkpoints: one directory per checkpoint (``checkpoint.layout``), reshardable across
TP/PP layouts; loading, and saving a Megatron model through the one writer
(``checkpoint.writer``: staged in ``<ckpt>.tmp``, renamed into place by rank 0, so a directory
without ``model_config.yaml`` is never a checkpoint we wrote).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from nemo_minitron.checkpoint.layout import (
    ALL_PARTS,
    CHECKPOINTS,
    METADATA,
    MODEL_CONFIG,
    OPTIMIZER,
    RNG,
    TOKENIZER,
    TRAIN_STATE,
    WEIGHTS,
    has_tokenizer,
    is_checkpoint,
    tokenizer_dir,
    weights_dir,
)
from nemo_minitron.checkpoint.layout import check_checkpoint as check_checkpoint
from nemo_minitron.checkpoint.layout import step_dir as step_dir
from nemo_minitron.checkpoint.manifest import MANIFEST, check_files
from nemo_minitron.checkpoint.safety import verify_dist_checkpoint
from nemo_minitron.checkpoint.writer import checkpoint_writer
from nemo_minitron.checkpoint.writer import no_space_left as no_space_left
from nemo_minitron.config import ConfigError, ModelConfig, ParallelConfig, from_dict
from nemo_minitron.data.tokenizer import Tokenizer, load_tokenizer
from nemo_minitron.model.build import unwrap
from nemo_minitron.utils.logging import get_logger
from nemo_minitron.utils.rank import global_rank

log = get_logger("checkpoint")

_warned_unverified: set[str] = set()
# Parts that a collective verification found intact, keyed by the manifest's identity: a resume
# verifies the whole checkpoint to choose it, then loads weights and optimizer state from it,
# and each would otherwise hash the same files again. Only collective calls fill it: every
# rank makes them in the same order, so every rank skips the same ones (a rank that skipped
# alone would leave the others waiting in the all-gather). A one-rank call only reads it.
_verified: set[tuple[str, str, int, int]] = set()


def verify_checkpoint(path: str | os.PathLike[str], parts: Sequence[str] = ALL_PARTS,
                      collective: bool = False) -> None:
    """``ConfigError`` unless the files under ``parts`` match the checkpoint's manifest (a
    warning, once, for a checkpoint without one). ``collective``: every rank calls this and
    each hashes a share of the files; parts already verified collectively under the same
    manifest are not hashed again."""
    p = Path(path)
    share = (0, 1)
    if collective and dist.is_initialized():
        share = (dist.get_rank(), dist.get_world_size())
    keys: dict[str, tuple[str, str, int, int]] = {}
    with contextlib.suppress(OSError):
        st = (p / MANIFEST).stat()
        keys = {part: (str(p.resolve()), part, st.st_ino, st.st_mtime_ns) for part in parts}
        parts = [part for part in parts if keys[part] not in _verified]
        if not parts:
            return
    try:
        err = check_files(p, parts, share)
    except FileNotFoundError:
        if str(p) not in _warned_unverified:
            _warned_unverified.add(str(p))
            log.warning("checkpoint %s has no %s (saved before checksums); loading it "
                        "unverified", p, MANIFEST)
        return
    if share[1] > 1:
        errs: list[str | None] = [None] * share[1]
        dist.all_gather_object(errs, err)
        err = next((e for e in errs if e), None)
    if err:
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt: {err}")
    if collective:
        _verified.update(keys[part] for part in parts if part in keys)


def load_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The ``ModelConfig`` stored in a checkpoint."""
    p = check_checkpoint(path)
    verify_checkpoint(p, (MODEL_CONFIG,))
    try:
        doc = yaml.safe_load((p / MODEL_CONFIG).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        raise ConfigError(f"{p / MODEL_CONFIG} is not valid UTF-8 YAML") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p / MODEL_CONFIG} must be a YAML mapping of model fields")
    return from_dict(ModelConfig, doc, "model.")


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
    """The tokenizer stored in a checkpoint (an error saying how to add one if it has none)."""
    p = check_checkpoint(path)
    if not has_tokenizer(p):
        raise ConfigError(f"checkpoint {str(path)!r} has no tokenizer (imported without one); "
                          f"add one by copying the model's tokenizer files (tokenizer.json and "
                          f"tokenizer_config.json, or tokenizer.model) into {tokenizer_dir(p)}/")
    verify_checkpoint(p, (TOKENIZER,))
    return load_tokenizer(tokenizer_dir(p))


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""The signals on which training saves and stops (``train.loop``)."""


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals while Megatron's writer starts its helpers (a queue manager,
    spawned once, and writer processes forked per save): they inherit the mask and so survive a
    signal sent to the whole process group (Ctrl-C, ``timeout``, torchrun, SLURM) instead of
    breaking the save. This process still receives them through its other threads, or when
    the mask is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from multiprocessing import resource_tracker

    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # Starting multiprocessing's resource tracker (a helper too) unblocks SIGINT/SIGTERM
        # behind our back: start it now, then block again.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def load_model(path: str | os.PathLike[str], parallel: ParallelConfig | None = None, *,
               bf16: bool = False, field: str = "checkpoint", **build: Any
               ) -> tuple[torch.nn.Module, ModelConfig, Tokenizer | None]:
    """Load a checkpoint into a fresh model: ``(model, its ModelConfig, its tokenizer or None
    when it has none)``; a verb that needs one calls ``load_checkpoint_tokenizer`` first.

    With ``parallel`` the process group and parallel state are started (or kept) for that
    layout first; without it the model is built under the current parallel state. Either way
    the weights are resharded to the layout on load. ``build``: more ``build_model`` options
    (``attention``, ``use_te``)."""
    from nemo_minitron.model.build import build_model

    p = check_checkpoint(path, field)
    cfg = load_model_config(p)
    if parallel is not None:
        from nemo_minitron.parallel.runtime import init_distributed

        init_distributed(parallel)
    model = build_model(cfg, bf16=bf16, **build)
    load_weights(p, model)
    return model, cfg, load_checkpoint_tokenizer(p) if has_tokenizer(p) else None


def _model_sharded_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    return unwrap(model).sharded_state_dict()


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module, *,
                    model_cfg: ModelConfig, tokenizer: Tokenizer | None,
                    optimizer: Any = None, scheduler: Any = None,
                    train_state: dict[str, Any] | None = None, overwrite: bool = False,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Collectively save a checkpoint (every rank calls this) through ``checkpoint_writer``
    (its failure handling too); ``metadata`` (JSON) is read back by ``load_metadata``."""
    from megatron.core import dist_checkpointing

    state = dict(train_state or {})
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    parts = (WEIGHTS, RNG) + ((OPTIMIZER,) if optimizer is not None else ())
    with checkpoint_writer(path, model_cfg=model_cfg, tokenizer=tokenizer, metadata=metadata,
                           train_state=state, parts=parts, overwrite=overwrite) as tmp:
        model_sd = _model_sharded_state_dict(model)
        with _stop_signals_blocked(), _in_process_results():
            dist_checkpointing.save(model_sd, str(tmp / WEIGHTS))
            if optimizer is not None:
                opt_sd = optimizer.sharded_state_dict(_model_sharded_state_dict(model))
                dist_checkpointing.save(opt_sd, str(tmp / OPTIMIZER))
        torch.save(get_rng_state(), tmp / RNG / f"rank_{global_rank():05d}.pt")
    return Path(path)


@contextlib.contextmanager
def _in_process_results() -> Iterator[None]:
    """megatron-core's torch_dist writer hands its write results through a queue made for
    asynchronous saves (another process): a ``multiprocessing`` manager, started by ``spawn``
    once per process, about 1.5 s of every CLI run that saves. These saves are synchronous
    (results put and read in this process), so a plain queue serves, for their duration only
    (a user's own asynchronous saves later get megatron-core's). Where megatron-core does not
    have the module attribute (another version), nothing changes."""
    import queue

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        yield
        return
    if getattr(fa, "_results_queue", False) is not None:  # absent, or already made
        yield
        return
    fa._results_queue = queue.Queue()
    try:
        yield
    finally:
        fa._results_queue = None


def _dist_load(sharded_state_dict: dict[str, Any], ckpt_dir: Path) -> dict[str, Any]:
    """``dist_checkpointing.load`` after checking that it unpickles plain data only."""
    from megatron.core import dist_checkpointing

    verify_dist_checkpoint(ckpt_dir)
    return dist_checkpointing.load(sharded_state_dict, str(ckpt_dir))


def load_weights(path: str | os.PathLike[str], model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into ``model`` (any TP/PP layout: resharded on load)."""
    p = check_checkpoint(path)
    verify_checkpoint(p, (WEIGHTS,), collective=True)
    inner = unwrap(model)
    state = _dist_load(inner.sharded_state_dict(), weights_dir(p))
    missing, unexpected = inner.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing:
        raise ConfigError(f"checkpoint {str(path)!r} lacks weights for {missing[:3]}"
                          f"{' ...' if len(missing) > 3 else ''}")


def load_training_state(path: str | os.PathLike[str], model: torch.nn.Module, optimizer: Any,
                        scheduler: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler and this rank's RNG; return the train state."""
    p = check_checkpoint(path)
    verify_checkpoint(p, (OPTIMIZER, TRAIN_STATE, RNG), collective=True)
    if optimizer is not None:
        if not (p / OPTIMIZER).is_dir():
            raise ConfigError(f"checkpoint {str(path)!r} holds no optimizer state to resume from")
        opt_sd = optimizer.sharded_state_dict(_model_sharded_state_dict(model), is_loading=True)
        optimizer.load_state_dict(_dist_load(opt_sd, p / OPTIMIZER))
    state = json.loads((p / TRAIN_STATE).read_text())
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    rng_file = p / RNG / f"rank_{global_rank():05d}.pt"
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


def step_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The complete ``<run_dir>/checkpoints/step_*`` checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if not p.name.endswith((".tmp", ".old"))
                  and is_checkpoint(p))


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete ``<run_dir>/checkpoints/step_*`` checkpoint, if any."""
    done = step_checkpoints(run_dir)
    return done[-1] if done else None


def latest_verified_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint under ``<run_dir>/checkpoints`` whose files match its manifest;
    newer corrupt ones are skipped with a warning. Collective."""
    for p in reversed(step_checkpoints(run_dir)):
        try:
            verify_checkpoint(p, collective=True)
            return p
        except ConfigError as e:
            log.warning("skipping %s: %s", p, e)
    return None

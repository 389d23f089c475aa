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

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from nemo_minitron.checkpoint.manifest import MANIFEST, check_files, write_manifest
from nemo_minitron.checkpoint.safety import verify_dist_checkpoint
from nemo_minitron.config import ConfigError, ModelConfig, ParallelConfig, from_dict, to_dict
from nemo_minitron.data.tokenizer import Tokenizer, load_tokenizer
from nemo_minitron.model.build import unwrap
from nemo_minitron.utils.fs import atomic_write_json, atomic_write_text, replace_dir
from nemo_minitron.utils.logging import get_logger
from nemo_minitron.utils.rank import barrier, global_rank

log = get_logger("checkpoint")

MODEL_CONFIG = "model_config.yaml"
METADATA = "metadata.json"
CHECKPOINTS = "checkpoints"
"""Training checkpoints of a run live in ``<run_dir>/checkpoints/step_<NNNNNNN>``."""


def step_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """The checkpoint directory of training step ``step`` in a run directory."""
    return Path(run_dir) / CHECKPOINTS / f"step_{int(step):07d}"


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


ALL_PARTS = (MODEL_CONFIG, "tokenizer", "weights", "optimizer", "train_state.json", "rng")
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


def has_tokenizer(path: str | os.PathLike[str]) -> bool:
    """Whether a checkpoint holds a tokenizer (an import from files without one does not)."""
    d = Path(path) / "tokenizer"
    return d.is_dir() and any(d.iterdir())


def load_checkpoint_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer stored in a checkpoint (an error saying how to add one if it has none)."""
    p = check_checkpoint(path)
    if not has_tokenizer(p):
        raise ConfigError(f"checkpoint {str(path)!r} has no tokenizer (imported without one); "
                          f"add one by copying the model's tokenizer files (tokenizer.json and "
                          f"tokenizer_config.json, or tokenizer.model) into {p / 'tokenizer'}/")
    verify_checkpoint(p, ("tokenizer",))
    return load_tokenizer(p / "tokenizer")


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


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module,
                    **kwargs: Any) -> Path:
    """Collectively save a checkpoint (every rank calls this; keywords: ``_write_checkpoint``).
    On failure the partial ``<path>.tmp`` is removed (an existing ``path`` is untouched); a
    full disk is a one-line ``ConfigError`` naming the directory."""
    try:
        return _write_checkpoint(path, model, **kwargs)
    except BaseException as e:  # torch's CheckpointException is a BaseException
        final = Path(path)
        full = no_space_left(e, final.parent)
        shutil.rmtree(final.with_name(final.name + ".tmp"), ignore_errors=True)
        if full:
            raise ConfigError(f"no space left on the device holding {final.parent} (saving "
                              f"{final.name}; the partial copy was removed)") from None
        raise


def no_space_left(exc: BaseException, where: str | os.PathLike[str]) -> bool:
    """Whether ``exc`` (or its cause) comes from a full disk. torch's writers do not always
    say so (``unexpected pos 704 vs 598``): then a device left with under 1 MiB counts."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT) \
                or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def _write_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module, *,
                      model_cfg: ModelConfig, tokenizer: Tokenizer | None,
                      optimizer: Any = None, scheduler: Any = None,
                      train_state: dict[str, Any] | None = None, overwrite: bool = False,
                      metadata: dict[str, Any] | None = None) -> Path:
    """The save itself; ``metadata`` (JSON) is read back by ``load_metadata``."""
    from megatron.core import dist_checkpointing

    t0 = time.perf_counter()
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
    barrier()
    model_sd = _model_sharded_state_dict(model)
    with _stop_signals_blocked():
        dist_checkpointing.save(model_sd, str(tmp / "weights"))
        if optimizer is not None:
            opt_sd = optimizer.sharded_state_dict(_model_sharded_state_dict(model))
            dist_checkpointing.save(opt_sd, str(tmp / "optimizer"))
    torch.save(get_rng_state(), tmp / "rng" / f"rank_{global_rank():05d}.pt")
    barrier()
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
        t_sum = time.perf_counter()
        entries = write_manifest(tmp)  # last: it covers every file
        t_sum = time.perf_counter() - t_sum
        replace_dir(tmp, final, overwrite=True)  # existence was refused above unless overwrite
        log.info("saved checkpoint %s in %.2fs (checksums of %.1f MB: %.2fs)", final,
                 time.perf_counter() - t0, sum(e["size"] for e in entries.values()) / 1e6,
                 t_sum)
    barrier()
    return final


def _dist_load(sharded_state_dict: dict[str, Any], ckpt_dir: Path) -> dict[str, Any]:
    """``dist_checkpointing.load`` after checking that it unpickles plain data only."""
    from megatron.core import dist_checkpointing

    verify_dist_checkpoint(ckpt_dir)
    return dist_checkpointing.load(sharded_state_dict, str(ckpt_dir))


def load_weights(path: str | os.PathLike[str], model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into ``model`` (any TP/PP layout: resharded on load)."""
    p = check_checkpoint(path)
    verify_checkpoint(p, ("weights",), collective=True)
    inner = unwrap(model)
    state = _dist_load(inner.sharded_state_dict(), p / "weights")
    missing, unexpected = inner.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing:
        raise ConfigError(f"checkpoint {str(path)!r} lacks weights for {missing[:3]}"
                          f"{' ...' if len(missing) > 3 else ''}")


def load_training_state(path: str | os.PathLike[str], model: torch.nn.Module, optimizer: Any,
                        scheduler: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler and this rank's RNG; return the train state."""
    p = check_checkpoint(path)
    verify_checkpoint(p, ("optimizer", "train_state.json", "rng"), collective=True)
    if optimizer is not None:
        if not (p / "optimizer").is_dir():
            raise ConfigError(f"checkpoint {str(path)!r} holds no optimizer state to resume from")
        opt_sd = optimizer.sharded_state_dict(_model_sharded_state_dict(model), is_loading=True)
        optimizer.load_state_dict(_dist_load(opt_sd, p / "optimizer"))
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

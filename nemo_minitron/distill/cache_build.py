"""Building a teacher cache (``teacher-cache``, ``search.teacher_cache``): the teacher's top-k
of every training (and validation) sample the distillation will read, in resumable chunks
(the format: ``distill.cache_format``).

Inputs are checked before the runtime starts: the data must be the teacher tokenizer's and
within its vocabulary (a token id past the embedding would fail mid-build). The cache is
written into ``.<name>.partial`` beside ``out`` and renamed when finished.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nemo_minitron.config import ConfigError
from nemo_minitron.distill.cache_format import ARRAYS, CHUNK_SAMPLES, META, data_key, token_checksum
from nemo_minitron.distill.cache_kl import vocab_parallel_topk
from nemo_minitron.distill.losses import one_process
from nemo_minitron.utils.fs import atomic_write_json
from nemo_minitron.utils.logging import get_logger

log = get_logger("distill.cache")


def partial_dir(out: str | os.PathLike[str]) -> Path:
    """Where ``out`` is built until it is finished (a re-run resumes there)."""
    return Path(out).with_name(f".{Path(out).name}.partial")


def _done(where: Path, chunk: int) -> Path:
    """The marker of a finished chunk of samples."""
    return where / "done" / f"chunk_{chunk:06d}"


def _write_split(teacher: torch.nn.Module, dataset: Any, n: int, out: Path, s: int, top_k: int,
                 *, mbs: int, group: Any, writer: bool, rank: int, dp_rank: int,
                 dp: int) -> None:
    """The teacher's top-k of ``dataset``'s first ``n`` samples into ``out``'s arrays, in chunks
    of ``CHUNK_SAMPLES`` (DP ranks take chunks in turn; finished chunks are skipped)."""
    from nemo_minitron.model.forward import forward_pass

    if rank == 0:
        (out / "done").mkdir(parents=True, exist_ok=True)
        for name, dtype, shape in (("ids", np.int32, (n, s, top_k)),
                                   ("logp", np.float32, (n, s, top_k)),
                                   ("tail", np.float32, (n, s)),
                                   ("check", np.int64, (n,))):
            f = out / f"{name}.npy"
            if f.is_file() and np.load(f, mmap_mode="r", allow_pickle=False).shape != shape:
                raise ConfigError(f"{out} holds an unfinished teacher cache of another run "
                                  f"({name}.npy is not {shape}); remove it or choose another path")
            if not f.is_file():
                np.lib.format.open_memmap(f, mode="w+", dtype=dtype, shape=shape).flush()
    dist.barrier()
    arrays = {name: np.load(out / f"{name}.npy", mmap_mode="r+", allow_pickle=False)
              for name in ARRAYS} if writer else {}
    chunks = [c for c in range(math.ceil(n / CHUNK_SAMPLES)) if c % dp == dp_rank]
    todo = [c for c in chunks if not _done(out, c).exists()]
    log.info("teacher cache %s: %d of %d chunks of this rank left", out.name, len(todo),
             len(chunks))
    t0 = time.perf_counter()
    for j, c in enumerate(todo):
        lo, hi = c * CHUNK_SAMPLES, min(n, (c + 1) * CHUNK_SAMPLES)
        rows = [dataset[i] for i in range(lo, hi)]
        tokens = torch.stack([r["tokens"] for r in rows])
        pad = (-len(rows)) % mbs  # whole micro-batches; padded rows are dropped
        if pad:
            tokens = torch.cat([tokens, tokens[:1].expand(pad, -1)])
        outs = forward_pass(teacher, tokens, micro_batch_size=mbs,
                            collect=lambda o: vocab_parallel_topk(
                                o.reshape(-1, o.shape[-1]), top_k, group))
        if writer:
            for j_, name in enumerate(("ids", "logp", "tail")):
                got = torch.cat([o[j_].reshape(mbs, s, -1) for o in outs])[:hi - lo]
                arrays[name][lo:hi] = got.reshape(arrays[name][lo:hi].shape).cpu().numpy()
            arrays["check"][lo:hi] = token_checksum(tokens[:hi - lo]).numpy()
            for a in arrays.values():
                a.flush()
            _done(out, c).touch()
        rate = (j + 1) * CHUNK_SAMPLES / (time.perf_counter() - t0)
        log.info("teacher cache %s: chunk %d/%d, %.1f samples/s, eta %.0f s", out.name, j + 1,
                 len(todo), rate, (len(todo) - j - 1) * CHUNK_SAMPLES / rate)
    dist.barrier()


def _claim(work: Path, teacher: str, fingerprint: list[float]) -> None:
    """Record which teacher ``work`` is built from; a resumed build must be that teacher's."""
    from nemo_minitron.model.params import same_weights

    f = work / "teacher.json"
    if f.is_file():
        have = json.loads(f.read_text())
        if not same_weights(fingerprint, have["teacher_fingerprint"]):
            raise ConfigError(f"{work} holds an unfinished cache of teacher {have['teacher']!r} "
                              f"(fingerprint {have['teacher_fingerprint']}), not of {teacher!r} "
                              f"(fingerprint {fingerprint}): remove it")
    else:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(f, {"teacher": teacher, "teacher_fingerprint": fingerprint})


def build_teacher_cache(teacher_ckpt: str, recipe: Any, out: str | os.PathLike[str],
                        top_k: int) -> dict[str, Any]:
    """Run the teacher once over the training samples ``recipe`` (a ``DistillRecipe``) will
    read and write its top-k log-probabilities to ``out``; resumes an unfinished build.
    Every rank calls it (DP ranks take chunks in turn; TP/PP as in training)."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.checkpoint.io import (
        check_checkpoint,
        load_checkpoint_tokenizer,
        load_model,
        load_model_config,
    )
    from nemo_minitron.data.resolve import check_data, check_vocab, resolve_data
    from nemo_minitron.distill.stage import teacher_validation_loss
    from nemo_minitron.model.params import weights_fingerprint
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.train.loop import validation_samples
    from nemo_minitron.train.pretrain import bf16_enabled, build_splits

    check_checkpoint(teacher_ckpt, "teacher")
    out = Path(out)
    if top_k < 1:
        raise ConfigError(f"--top-k={top_k} must be >= 1")
    if (out / META).is_file():
        raise FileExistsError(f"teacher cache {out} already exists")
    if out.exists():  # unfinished builds live in partial_dir(out)
        raise ConfigError(f"{out} exists and is not a finished teacher cache: remove it or "
                          "choose another --out")
    cfg = load_model_config(teacher_ckpt)
    if top_k > cfg.vocab_size:
        raise ConfigError(f"--top-k={top_k} exceeds the teacher's vocabulary ({cfg.vocab_size})")
    tokenizer = load_checkpoint_tokenizer(teacher_ckpt)
    check_data(recipe.data, tokenizer)
    check_vocab(recipe.data, tokenizer, cfg.vocab_size, f"the teacher {teacher_ckpt!r}")
    rt = init_distributed(recipe.parallel, seed=recipe.train.seed)
    prefix, tokenizer = resolve_data(recipe.data, tokenizer)
    work = partial_dir(out)
    s = recipe.train.seq_length or cfg.seq_length  # the windows distill will read
    splits = build_splits(recipe, prefix, tokenizer, s)
    t = recipe.train
    n = min(len(splits.train), t.train_iters * t.global_batch_size)
    bf16 = bf16_enabled(recipe)
    teacher, _, _ = load_model(teacher_ckpt, bf16=bf16)
    fingerprint = weights_fingerprint(teacher)
    group = ps.get_tensor_model_parallel_group()
    group = None if one_process(group) else group
    writer = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    dp_rank, dp = ps.get_data_parallel_rank(), rt.dp
    valid_len = len(splits.valid) if splits.valid is not None else 0
    n_valid = validation_samples(t, valid_len)
    log.info("teacher cache: %d training + %d validation samples x %d tokens, top-%d",
             n, n_valid, s, top_k)
    log.info("teacher cache: building in %s", work)
    if rt.rank == 0:
        _claim(work, str(teacher_ckpt), fingerprint)
    parts = ((work, splits.train, n), (work / "valid", splits.valid, n_valid))
    for where, dataset, count in parts:
        if count:
            _write_split(teacher, dataset, count, where, s, top_k, mbs=t.micro_batch_size,
                         group=group, writer=writer, rank=rt.rank, dp_rank=dp_rank, dp=dp)
    teacher_loss, split, n_loss = teacher_validation_loss(teacher, splits.valid, splits.train, t)
    meta = {"top_k": top_k, "num_samples": n, "seq_length": s, "vocab_size": cfg.vocab_size,
            "dataset_len": len(splits.train), "valid_samples": n_valid,
            "valid_dataset_len": valid_len,
            "teacher": str(teacher_ckpt), "teacher_fingerprint": fingerprint,
            "teacher_bf16": bf16,
            "teacher_valid_loss": teacher_loss, "teacher_loss_split": split,
            "teacher_loss_sequences": n_loss, "tokenizer_vocab_size": tokenizer.vocab_size,
            "data": data_key(recipe)}
    if rt.rank == 0:
        missing = [f"{where.name}/{c}" for where, _, count in parts
                   for c in range(math.ceil(count / CHUNK_SAMPLES)) if not _done(where, c).exists()]
        if missing:
            raise RuntimeError(f"teacher cache chunks {missing[:3]} were not written")
        atomic_write_json(work / META, meta)
        os.rename(work, out)
        log.info("teacher cache written to %s (%.1f MB)", out,
                 sum(f.stat().st_size for f in out.rglob("*.npy")) / 1e6)
    dist.barrier()
    return meta

"""Offline teacher logits: the teacher's top-k log-probabilities of every training token,
computed once and read by distillation instead of running the teacher.

The architecture search distills every candidate from the same teacher on the same data, so it
runs the same teacher forward passes once per candidate; with a cache it runs them once.

A cache directory::

    ids.npy     [num_samples, seq_length, k] int32    the teacher's k most likely token ids
    logp.npy    [num_samples, seq_length, k] float32  their log-probabilities (full softmax)
    tail.npy    [num_samples, seq_length] float32     log of the teacher's mass outside them
    check.npy   [num_samples] int64                   a checksum of each sample's tokens
    done/       one marker per finished chunk of samples (a killed build resumes)
    valid/      the same four arrays and done/ for the validation split's fixed samples (the
                first train.eval_iters x train.global_batch_size, which every validation reads)
    meta.json   written last, atomically: k, shapes, the teacher, the data, the teacher's
                validation loss. A directory without it is an unfinished cache.

Sample ``i`` is the training dataset's sample ``i`` (``data.datasets.micro_batches`` hands each
micro-batch's dataset indices to the objective as ``sample_index``), and in ``valid/`` the
validation dataset's; the checksum catches a cache used with other data. The arrays are
``.npy`` files read with ``allow_pickle=False``.

The loss, forward KL on the top-k support plus one tail bucket. With ``K`` the cached tokens,
``q = 1 - sum_K p_t`` and ``Q = 1 - sum_K p_s``::

    KL_k = sum_{v in K} p_t(v) log(p_t(v) / p_s(v)) + q log(q / Q)

is the forward KL between the teacher's and the student's distributions coarse-grained to the
k cached tokens plus one "any other token" bucket. By the data-processing inequality
``0 <= KL - KL_k = q * KL(p_t(. | tail) || p_s(. | tail))``: the error is at most the
teacher's tail mass times the divergence inside the tail, and zero when k covers the
vocabulary. Its gradient (written by hand, vocab-parallel like ``losses``) is
``p_s(v) - p_t(v)`` on the cached tokens and ``p_s(v) (1 - q / Q)`` elsewhere. Both tail masses
are log-sum-exps over the tokens outside ``K`` (never ``1 - sum``, which cancels), so an empty
tail is exactly zero.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nemo_minitron.config import ConfigError
from nemo_minitron.distill.losses import (
    ChunkTokens,
    chunk_rows,
    compute_dtype,
    log_softmax,
    one_process,
    tp_allreduce,
)
from nemo_minitron.utils.fs import atomic_write_json
from nemo_minitron.utils.logging import get_logger

log = get_logger("distill.cache")

META = "meta.json"
CHUNK_SAMPLES = 32
"""Samples per resumable unit of the build."""


def token_checksum(tokens: torch.Tensor) -> torch.Tensor:
    """``[b]`` int64 checksum of ``tokens [b, s]`` (position-weighted, so order matters)."""
    pos = torch.arange(1, tokens.shape[-1] + 1, dtype=torch.int64, device=tokens.device)
    return ((tokens.long() + 1) * pos).sum(-1) % 2_147_483_647


def _outside(ids: torch.Tensor, start: int, v_local: int) -> torch.Tensor:
    """``[n, V/TP]`` bool: this rank's vocabulary entries that are not among ``ids [n, k]``."""
    local = ids.long() - start
    mine = (local >= 0) & (local < v_local)
    hits = torch.zeros(ids.shape[0], v_local, dtype=torch.int32, device=ids.device)
    hits.scatter_add_(-1, local.clamp(0, v_local - 1), mine.int())  # no write collisions
    return hits == 0


def _masked_lse(z: torch.Tensor, keep: torch.Tensor,
                group: dist.ProcessGroup | None) -> torch.Tensor:
    """Vocab-parallel log-sum-exp ``[n]`` over the entries ``keep`` selects (-inf if none)."""
    zk = z.masked_fill(~keep, float("-inf"))
    m = tp_allreduce(zk.max(dim=-1).values, group, dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m + tp_allreduce((zk - m.unsqueeze(-1)).exp().sum(-1), group).log()


def vocab_parallel_topk(logits: torch.Tensor, k: int, group: dist.ProcessGroup | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global ``(ids [n, k], log-probs [n, k], log tail mass [n])`` of vocab-parallel
    ``logits [n, V/TP]``; the log-probs are ``losses.log_softmax``'s, as the online loss'."""
    logp = log_softmax(compute_dtype(logits), group)
    v_local = logp.shape[-1]
    start = v_local * (dist.get_rank(group) if group is not None else 0)
    vals, idx = logp.topk(min(k, v_local), dim=-1)
    idx = idx + start
    if not one_process(group):
        world = dist.get_world_size(group)
        all_v = [torch.empty_like(vals) for _ in range(world)]
        all_i = [torch.empty_like(idx) for _ in range(world)]
        dist.all_gather(all_v, vals.contiguous(), group=group)
        dist.all_gather(all_i, idx.contiguous(), group=group)
        vals, idx = torch.cat(all_v, -1), torch.cat(all_i, -1)
        vals, pick = vals.topk(k, dim=-1)
        idx = idx.gather(-1, pick)
    tail = _masked_lse(logp, _outside(idx, start, v_local), group)
    return idx.int(), vals, tail


class _CachedForwardKL(torch.autograd.Function):
    """Per-token ``KL_k`` of student logits ``[n, V/TP]`` against cached teacher top-k, chunk
    by chunk; backward recomputes the chunk's softmax (memory: a few chunk-sized buffers)."""

    @staticmethod
    def forward(ctx, student, ids, logp_t, tail_t, group, step):  # type: ignore[override]
        n, v_local = student.shape
        start = v_local * (dist.get_rank(group) if group is not None else 0)
        out = torch.empty(n, dtype=torch.float64 if student.dtype == torch.float64
                          else torch.float32, device=student.device)
        with torch.no_grad():
            for i in range(0, n, step):
                ls_full = log_softmax(compute_dtype(student[i:i + step]), group)
                lt, ls, tails = _chunk(ls_full, ids[i:i + step], logp_t[i:i + step],
                                       tail_t[i:i + step], start, group)
                q, log_q, log_q_s = tails
                tail = torch.where(q > 0, q * (log_q - log_q_s), 0.0)
                out[i:i + step] = (lt.exp() * (lt - ls)).sum(-1) + tail
        ctx.save_for_backward(student, ids, logp_t, tail_t)
        ctx.args = (group, step, start)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        student, ids, logp_t, tail_t = ctx.saved_tensors
        group, step, start = ctx.args
        d = torch.empty_like(student)
        v_local = student.shape[-1]
        for i in range(0, student.shape[0], step):
            ls_full = log_softmax(compute_dtype(student[i:i + step]), group)
            lt, ls, (q, log_q, log_q_s) = _chunk(ls_full, ids[i:i + step], logp_t[i:i + step],
                                                 tail_t[i:i + step], start, group)
            r = torch.where(q > 0, (log_q - log_q_s).exp(), 0.0)  # q / Q
            g = ls_full.exp_().mul_((1.0 - r).unsqueeze(-1))  # outside K
            # on K: p_s - p_t, added as a delta on this rank's own ids (the others add 0)
            local = ids[i:i + step].long() - start
            mine = (local >= 0) & (local < v_local)
            delta = (ls.exp() * r.unsqueeze(-1) - lt.exp()) * mine
            g.scatter_add_(-1, local.clamp(0, v_local - 1), delta)
            d[i:i + step] = (g * grad[i:i + step, None]).to(d.dtype)
        return d, None, None, None, None, None


def _chunk(ls_full, ids, logp_t, tail_t, start, group):
    """Teacher and student log-probs on ``K`` ``[n, k]`` and the tails ``(q, log q, log Q)``,
    from the student's log-probs ``ls_full [n, V/TP]``."""
    local = ids.long() - start
    mine = (local >= 0) & (local < ls_full.shape[-1])
    picked = ls_full.gather(-1, local.clamp(0, ls_full.shape[-1] - 1))
    ls = tp_allreduce(torch.where(mine, picked, torch.zeros_like(picked)), group)
    log_q_s = _masked_lse(ls_full, _outside(ids, start, ls_full.shape[-1]), group)
    log_q = tail_t.to(ls_full.dtype)
    return logp_t.to(ls_full.dtype), ls, (log_q.exp(), log_q, log_q_s)


def cached_forward_kl(student: torch.Tensor, ids: torch.Tensor, logp_t: torch.Tensor,
                      tail_t: torch.Tensor, *, chunk_tokens: ChunkTokens = "auto",
                      group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Per-token ``KL_k`` (module docstring) of ``student [..., V/TP]`` logits against the
    teacher's cached ``ids [..., k]`` (global token ids), ``logp_t [..., k]`` and log tail mass
    ``tail_t [...]``."""
    lead = student.shape[:-1]
    s2 = student.reshape(-1, student.shape[-1])
    k = ids.shape[-1]
    step = chunk_rows(chunk_tokens, s2.shape[0], s2.shape[-1], s2.device)
    out = _CachedForwardKL.apply(s2, ids.reshape(-1, k), logp_t.reshape(-1, k),
                                 tail_t.reshape(-1), group, step)
    return out.reshape(lead)


@dataclass
class TeacherCache:
    """An opened, complete cache (memory-mapped, read-only)."""

    path: Path
    meta: dict[str, Any]
    ids: np.ndarray
    logp: np.ndarray
    tail: np.ndarray
    check: np.ndarray
    valid: TeacherCache | None = None
    """The validation split's samples (``valid/``); None when the cache was built without
    validation (train.eval_interval=0)."""

    def rows(self, index: torch.Tensor, tokens: torch.Tensor, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids [b, s, k], logp [b, s, k], tail [b, s])`` of dataset samples ``index [b]``
        whose input tokens are ``tokens [b, s]``; a one-line error if the cache saw others."""
        idx = index.cpu().numpy()
        if idx.max(initial=0) >= len(self.check):
            raise ConfigError(f"teacher cache {str(self.path)!r} holds {len(self.check)} samples; "
                              f"the run needs sample {int(idx.max())} (rebuild it for "
                              "train.train_iters x train.global_batch_size samples)")
        if not np.array_equal(self.check[idx], token_checksum(tokens.cpu()).numpy()):
            raise ConfigError(f"teacher cache {str(self.path)!r} was built on other data "
                              "(token checksums differ): use the same data.* settings")
        return tuple(torch.from_numpy(np.ascontiguousarray(a[idx])).to(device)
                     for a in (self.ids, self.logp, self.tail))  # type: ignore[return-value]


ARRAYS = ("ids", "logp", "tail", "check")


def _open_arrays(p: Path, want: tuple[int, int, int], path: str) -> list[np.ndarray]:
    try:
        arrays = [np.load(p / f"{f}.npy", mmap_mode="r", allow_pickle=False) for f in ARRAYS]
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher cache {path!r} is unreadable: {e}") from None
    ids, logp, tail, check = arrays
    if ids.shape != want or logp.shape != want or tail.shape != want[:2] \
            or check.shape != want[:1]:
        raise ConfigError(f"teacher cache {path!r}: array shapes {ids.shape}, "
                          f"{logp.shape}, {tail.shape}, {check.shape} do not match {META} {want}")
    return arrays


def open_cache(path: str | os.PathLike[str]) -> TeacherCache:
    """Open a finished cache; one-line errors for a missing or unfinished one."""
    p = Path(path)
    if not (p / META).is_file():
        raise ConfigError(f"kd.teacher_cache={str(path)!r} is not a finished teacher cache "
                          f"(no {META}; build it with `nemo-minitron teacher-cache`)")
    try:
        meta = json.loads((p / META).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"teacher cache {str(path)!r} is unreadable: {e}") from None
    want = (meta["num_samples"], meta["seq_length"], meta["top_k"])
    cache = TeacherCache(p, meta, *_open_arrays(p, want, str(path)))
    if meta.get("valid_samples"):
        want = (meta["valid_samples"], *want[1:])
        cache.valid = TeacherCache(p / "valid", meta, *_open_arrays(p / "valid", want,
                                                                   str(path)))
    return cache


def data_key(recipe: Any) -> dict[str, Any]:
    """What must agree between a cache and a run reading it."""
    d = recipe.data
    return {"path": d.path, "tokenizer": d.tokenizer, "split": d.split, "seed": d.seed,
            "cache_dir": None if d.path else str(Path(d.cache_dir).expanduser()),
            "corpus_max_bytes": None if d.path else d.corpus_max_bytes,
            "tokenizer_vocab_size": None if d.path or d.tokenizer else d.tokenizer_vocab_size}


def check_compatible(cache: TeacherCache, recipe: Any, seq_length: int, vocab_size: int) -> None:
    """One-line errors for a cache that does not fit this distillation run."""
    m, t = cache.meta, recipe.train
    where = f"teacher cache {str(cache.path)!r}"
    if m["seq_length"] != seq_length:
        raise ConfigError(f"{where} has seq_length {m['seq_length']}, the student {seq_length}")
    if m["vocab_size"] != vocab_size:
        raise ConfigError(f"{where}: the teacher's padded vocabulary {m['vocab_size']} differs "
                          f"from the student's {vocab_size}")
    if m["data"] != data_key(recipe):
        raise ConfigError(f"{where} was built with other data settings ({m['data']})")
    need = t.train_iters * t.global_batch_size
    if m["num_samples"] < min(need, m["dataset_len"]):
        raise ConfigError(f"{where} holds {m['num_samples']} samples; train.train_iters x "
                          f"train.global_batch_size = {need} (rebuild it for this run)")
    from nemo_minitron.train.loop import validation_samples

    # A cache from before validation samples were cached has no valid_dataset_len: it has none.
    need = validation_samples(t, m.get("valid_dataset_len", t.eval_iters * t.global_batch_size))
    if m.get("valid_samples", 0) < need:
        raise ConfigError(f"{where} holds {m.get('valid_samples', 0)} validation samples; "
                          f"train.eval_iters x train.global_batch_size = {need} (rebuild it "
                          "for this run, or set train.eval_interval=0)")


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
    from nemo_minitron.data.resolve import resolve_data
    from nemo_minitron.distill.stage import teacher_validation_loss
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.train.loop import validation_samples
    from nemo_minitron.train.pretrain import bf16_enabled, build_splits

    check_checkpoint(teacher_ckpt, "teacher")
    out = Path(out)
    if top_k < 1:
        raise ConfigError(f"--top-k={top_k} must be >= 1")
    if (out / META).is_file():
        raise FileExistsError(f"teacher cache {out} already exists")
    cfg = load_model_config(teacher_ckpt)
    if top_k > cfg.vocab_size:
        raise ConfigError(f"--top-k={top_k} exceeds the teacher's vocabulary ({cfg.vocab_size})")
    rt = init_distributed(recipe.parallel, seed=recipe.train.seed)
    prefix, tokenizer = resolve_data(recipe.data, load_checkpoint_tokenizer(teacher_ckpt))
    s = recipe.train.seq_length or cfg.seq_length  # the windows distill will read
    splits = build_splits(recipe, prefix, tokenizer, s)
    t = recipe.train
    n = min(len(splits.train), t.train_iters * t.global_batch_size)
    teacher, _, _ = load_model(teacher_ckpt, bf16=bf16_enabled(recipe))
    group = ps.get_tensor_model_parallel_group()
    group = None if one_process(group) else group
    writer = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    dp_rank, dp = ps.get_data_parallel_rank(), rt.dp
    valid_len = len(splits.valid) if splits.valid is not None else 0
    n_valid = validation_samples(t, valid_len)
    log.info("teacher cache: %d training + %d validation samples x %d tokens, top-%d",
             n, n_valid, s, top_k)
    parts = ((out, splits.train, n), (out / "valid", splits.valid, n_valid))
    for where, dataset, count in parts:
        if count:
            _write_split(teacher, dataset, count, where, s, top_k, mbs=t.micro_batch_size,
                         group=group, writer=writer, rank=rt.rank, dp_rank=dp_rank, dp=dp)
    teacher_loss, split, n_loss = teacher_validation_loss(teacher, splits.valid, splits.train, t)
    meta = {"top_k": top_k, "num_samples": n, "seq_length": s, "vocab_size": cfg.vocab_size,
            "dataset_len": len(splits.train), "valid_samples": n_valid,
            "valid_dataset_len": valid_len,
            "teacher": str(teacher_ckpt),
            "teacher_valid_loss": teacher_loss, "teacher_loss_split": split,
            "teacher_loss_sequences": n_loss, "tokenizer_vocab_size": tokenizer.vocab_size,
            "data": data_key(recipe)}
    if rt.rank == 0:
        missing = [f"{where.name}/{c}" for where, _, count in parts
                   for c in range(math.ceil(count / CHUNK_SAMPLES)) if not _done(where, c).exists()]
        if missing:
            raise RuntimeError(f"teacher cache chunks {missing[:3]} were not written")
        atomic_write_json(out / META, meta)
        log.info("teacher cache written to %s (%.1f MB)", out,
                 sum(f.stat().st_size for f in out.rglob("*.npy")) / 1e6)
    dist.barrier()
    return meta

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
    meta.json   written last: k, shapes, the teacher (its path and ``weights_fingerprint``:
                another teacher is refused), the data, the teacher's validation loss.

It is built (``cache_build``) in ``.<name>.partial`` beside it, renamed when finished, so the
path holds a finished cache or nothing; a killed build resumes from the partial directory.

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
import os
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


def check_teacher(cache: TeacherCache, teacher_ckpt: str, teacher: torch.nn.Module) -> None:
    """One-line error (both fingerprints, both paths) unless ``cache`` was built from the
    weights of ``teacher`` (loaded from ``teacher_ckpt``; collective under TP/PP)."""
    from nemo_minitron.model.params import same_weights, weights_fingerprint

    want = cache.meta.get("teacher_fingerprint")
    have = weights_fingerprint(teacher)
    if want is None:
        log.warning("teacher cache %s records no teacher fingerprint (an older build): that "
                    "it comes from --teacher %s cannot be checked", cache.path, teacher_ckpt)
    elif not same_weights(have, want):
        raise ConfigError(f"teacher cache {str(cache.path)!r} was built from teacher "
                          f"{cache.meta.get('teacher')!r} (weights fingerprint {want}), not "
                          f"from --teacher {teacher_ckpt!r} (fingerprint {have}): rebuild it "
                          f"with `nemo-minitron teacher-cache --teacher {teacher_ckpt}`")

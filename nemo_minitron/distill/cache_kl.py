"""The top-k KL of distillation against a teacher cache (``distill.cache_format``): the
teacher's top-k of vocab-parallel logits when the cache is built, and the loss a run computes
from them.

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

import torch
import torch.distributed as dist

from nemo_minitron.distill.losses import (
    ChunkTokens,
    chunk_rows,
    compute_dtype,
    log_softmax,
    one_process,
    tp_allreduce,
)
from nemo_minitron.model.layouts import vocab_range


def _vocab_start(v_local: int, group: dist.ProcessGroup | None) -> int:
    """The first global token id of this TP rank's ``v_local`` logit columns."""
    return vocab_range(v_local, dist.get_rank(group) if group is not None else 0)[0]


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
    start = _vocab_start(v_local, group)
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
        start = _vocab_start(v_local, group)
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

"""Distillation losses, each with its shapes documented.

Logit divergence, vocab-parallel: under tensor parallelism every rank holds a ``[tokens, V/TP]``
slice of the student's and the teacher's logits. Softmax statistics (max, sum of exponentials)
and per-token sums are all-reduced over the TP group; the full vocabulary is never gathered.
The gradient is written by hand (``_VocabParallelDivergence``) because an all-reduce inside
autograd would need a matching all-reduce in backward for every statistic. Tokens are processed
in chunks (their size derived from the vocabulary slice and the device, ``chunk_rows``); forward KL
computes its gradient in the same pass, the other divergences recompute the chunk's softmaxes in
backward, so beyond the logits and their gradient memory stays at a few ``[chunk, V/TP]`` buffers.

Temperature: both logits are divided by ``T`` and the divergence is multiplied by ``T^2``
(Hinton et al.), so gradient magnitudes do not shrink as ``T`` grows; at ``T=1`` nothing changes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist

from nemo_minitron.model.layouts import vocab_range

Divergence = Literal["forward", "reverse", "js"]
ChunkTokens = int | Literal["auto"] | None
"""Tokens per chunk of a logit loss: a number, None (all at once) or "auto" (``chunk_rows``)."""


def tp_allreduce(x: torch.Tensor, group: dist.ProcessGroup | None,
               op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """fp32 for bf16/fp16/fp32 logits; fp64 stays fp64 (exact reference checks)."""
    return x if x.dtype == torch.float64 else x.float()


def _log_softmax(z: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Vocab-parallel log-softmax of ``z [n, V/TP]`` (fp32)."""
    return z - vocab_parallel_lse(z, group).unsqueeze(-1)


def _pick(logits: torch.Tensor, labels: torch.Tensor,
          group: dist.ProcessGroup | None) -> torch.Tensor:
    """``logits[i, labels[i]]`` of vocab-parallel ``logits [n, V/TP]`` (the owning rank's
    value, all-reduced)."""
    v_local = logits.shape[-1]
    start, end = vocab_range(v_local, dist.get_rank(group) if group is not None else 0)
    mine = (labels >= start) & (labels < end)
    picked = compute_dtype(logits.gather(-1, (labels - start).clamp(0, v_local - 1)
                                          .unsqueeze(-1)).squeeze(-1))
    return tp_allreduce(torch.where(mine, picked, torch.zeros_like(picked)), group)


def vocab_parallel_lse(z: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Vocab-parallel log-sum-exp over the last dim ``[n]``."""
    if group is None or dist.get_world_size(group) == 1:
        return torch.logsumexp(z, dim=-1)  # one fused kernel
    m = tp_allreduce(z.max(dim=-1, keepdim=True).values, group, dist.ReduceOp.MAX)
    return (m + tp_allreduce((z - m).exp().sum(dim=-1, keepdim=True), group).log()).squeeze(-1)


def _teacher_log_probs(t: torch.Tensor, top_k: int | None,
                       group: dist.ProcessGroup | None) -> torch.Tensor:
    """Teacher log-probabilities; with ``top_k`` renormalised over its k best tokens (the rest
    get -inf). The k-th largest logit is found from each rank's local top-k."""
    if top_k is not None:
        k = min(top_k, t.shape[-1])
        local = t.topk(k, dim=-1).values  # [n, k]
        if group is not None and dist.get_world_size(group) > 1:
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, local.contiguous(), group=group)
            local = torch.cat(parts, dim=-1)
        kth = local.topk(top_k, dim=-1).values[:, -1:]
        t = t.masked_fill(t < kth, float("-inf"))
    return _log_softmax(t, group)


def _divergence(ls: torch.Tensor, lt: torch.Tensor, kind: Divergence,
                group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence ``[n]`` and ``dL/dz_student [n, V/TP]`` (per unit of loss) from
    student/teacher log-probs. ``a`` is dL/dlog p_s; the softmax chain rule turns it into
    ``p_s * (a - sum_v p_s a)`` (the sum all-reduced)."""
    ps, pt = ls.exp(), lt.exp()
    if kind == "forward":  # KL(p_t || p_s)
        per = torch.special.xlogy(pt, pt) - torch.where(pt > 0, pt * ls, 0.0)
        return tp_allreduce(per.sum(-1), group), ps - pt
    if kind == "reverse":  # KL(p_s || p_t)
        a = ls - lt
        per = tp_allreduce((ps * a).sum(-1), group)
        return per, ps * (a - per.unsqueeze(-1))
    lm = torch.logaddexp(ls, lt) - math.log(2.0)  # log of the mixture m = (p_s + p_t) / 2
    kl_sm = tp_allreduce((ps * (ls - lm)).sum(-1), group)
    kl_tm = tp_allreduce((torch.special.xlogy(pt, pt) - torch.where(pt > 0, pt * lm, 0.0)).sum(-1),
                       group)
    a = 0.5 * (ls - lm)
    return 0.5 * (kl_sm + kl_tm), ps * (a - 0.5 * kl_sm.unsqueeze(-1))


def _softmax_and_lse(z: torch.Tensor, group: dist.ProcessGroup | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocab-parallel ``softmax(z)`` (overwriting a temporary, one ``exp`` per element) and
    ``lse(z) [n]`` of ``z [n, V/TP]``; ``torch.logsumexp`` followed by ``exp(z - lse)`` would
    exponentiate every element twice."""
    m = tp_allreduce(z.max(dim=-1, keepdim=True).values, group, dist.ReduceOp.MAX)
    e = (z - m).exp_()
    total = tp_allreduce(e.sum(dim=-1, keepdim=True), group)
    return e.div_(total), (m + total.log()).squeeze(-1)


class _VocabParallelDivergence(torch.autograd.Function):
    """Per-token ``T^2 * D(teacher, student)`` of ``[n, V/TP]`` logits, chunk by chunk.

    Forward KL without top-k (the method's loss) is fused: one pass over each chunk computes
    both softmaxes, the divergence and its gradient ``p_s - p_t``, written into one
    logits-sized buffer that backward only scales; neither logits tensor is kept for backward.
    The other divergences recompute each chunk's softmaxes in backward (the loss adds the
    gradient buffer plus a few chunk-sized ones)."""

    @staticmethod
    def forward(ctx, student, teacher, kind, temperature, top_k, group, step,  # type: ignore[override]
                labels, with_grad):
        out = torch.empty(student.shape[0], dtype=torch.float32 if student.dtype != torch.float64
                          else torch.float64, device=student.device)
        fast = kind == "forward" and top_k is None
        lse_s = torch.empty_like(out)
        dstudent = torch.empty_like(student) if fast and with_grad else None
        with torch.no_grad():
            for i in range(0, student.shape[0], step):
                zs = compute_dtype(student[i:i + step]) / temperature
                zt = compute_dtype(teacher[i:i + step]) / temperature
                if fast:  # KL(p_t || p_s) = sum p_t (z_t - z_s) - lse_t + lse_s
                    pt, lse_t = _softmax_and_lse(zt, group)
                    ps, lse_s[i:i + step] = _softmax_and_lse(zs, group)
                    cross = tp_allreduce(torch.linalg.vecdot(pt, zt.sub_(zs)), group)
                    out[i:i + step] = cross - lse_t + lse_s[i:i + step]
                    if dstudent is not None:
                        dstudent[i:i + step] = ps.sub_(pt)
                else:
                    ls = _log_softmax(zs, group)
                    lt = _teacher_log_probs(zt, top_k, group)
                    out[i:i + step] = _divergence(ls, lt, kind, group)[0]
        if fast:
            ctx.dstudent = dstudent
        else:
            ctx.save_for_backward(student, teacher)
        ctx.args = (kind, temperature, top_k, group, step, fast)
        if labels is None:
            return out * temperature**2, None
        # At T=1 the student's cross-entropy is lse_s - z_s[label]: no second softmax pass.
        ce = lse_s - _pick(student, labels, group)
        ctx.mark_non_differentiable(ce)
        return out * temperature**2, ce

    @staticmethod
    def backward(ctx, grad, _grad_ce=None):  # type: ignore[override]
        kind, temperature, top_k, group, step, fast = ctx.args
        # d(T^2 D)/d logits = T^2 * dD/dz / T
        g = grad.unsqueeze(-1) * temperature
        if fast:  # dKL/dz_s = p_s - p_t, computed in forward
            if ctx.dstudent is None:
                raise RuntimeError("logit_divergence has no gradient to give: it ran under "
                                   "no_grad, or its backward already ran")
            dstudent, ctx.dstudent = ctx.dstudent.mul_(g), None
            return dstudent, None, None, None, None, None, None, None, None
        student, teacher = ctx.saved_tensors
        dstudent = torch.empty_like(student)
        for i in range(0, student.shape[0], step):
            ls = _log_softmax(compute_dtype(student[i:i + step]) / temperature, group)
            lt = _teacher_log_probs(compute_dtype(teacher[i:i + step]) / temperature, top_k,
                                    group)
            _, dz = _divergence(ls, lt, kind, group)
            del ls, lt
            dstudent[i:i + step] = dz.mul_(g[i:i + step])
        return dstudent, None, None, None, None, None, None, None, None


# Bytes of one fp32 ``[chunk, V/TP]`` buffer when the chunk is chosen from the shapes
# (``chunk_tokens="auto"``): on CPU small enough that a chunk's passes stay in cache, on GPU
# large enough that each kernel has work (measured: ``benchmarks/kd_efficiency.py --chunks``).
AUTO_CHUNK_BYTES = {"cpu": 1 << 21, "cuda": 1 << 28}


def chunk_rows(chunk_tokens: ChunkTokens, n: int, v_local: int,
               device: torch.device) -> int:
    """Tokens per chunk of a ``[n, V/TP]`` logit loss: ``chunk_tokens`` as given, all ``n`` for
    None, or for ``"auto"`` the tokens whose fp32 row slice fills ``AUTO_CHUNK_BYTES`` (at
    least 8)."""
    if chunk_tokens == "auto":
        budget = AUTO_CHUNK_BYTES.get(device.type, AUTO_CHUNK_BYTES["cuda"])
        chunk_tokens = max(8, budget // (4 * max(v_local, 1)))
    return max(min(chunk_tokens or n, n), 1)


def _needs_grad(student: torch.Tensor) -> bool:
    """Whether the fused path should compute the gradient in forward (not under no_grad)."""
    return torch.is_grad_enabled() and student.requires_grad


def logit_divergence(student: torch.Tensor, teacher: torch.Tensor, *,
                     kind: Divergence = "forward", temperature: float = 1.0,
                     top_k: int | None = None, chunk_tokens: ChunkTokens = "auto",
                     group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Per-token divergence between teacher and student logits.

    ``student``, ``teacher``: ``[..., V/TP]`` logits (this rank's vocabulary slice under TP;
    ``group`` is the TP group, None for one process). Returns ``[...]`` (fp32): forward
    ``KL(p_t || p_s)``, reverse ``KL(p_s || p_t)`` or Jensen-Shannon, times ``T^2``. ``top_k``
    (forward only) keeps the teacher's k most likely tokens, renormalised. ``chunk_tokens``
    bounds the temporary memory (None: one chunk; "auto": from the shapes, ``chunk_rows``)."""
    if top_k is not None and kind != "forward":
        raise ValueError("kd.top_k works with kd.divergence=forward only (the teacher's "
                         "truncated distribution has zeros)")
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits "
                         f"{tuple(teacher.shape)} differ")
    lead = student.shape[:-1]
    s2, t2 = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    step = chunk_rows(chunk_tokens, s2.shape[0], s2.shape[-1], s2.device)
    out, _ = _VocabParallelDivergence.apply(s2, t2.detach(), kind, temperature, top_k, group,
                                            step, None, _needs_grad(s2))
    return out.reshape(lead)


def logit_divergence_and_ce(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                            *, kind: Divergence = "forward", temperature: float = 1.0,
                            top_k: int | None = None, chunk_tokens: ChunkTokens = "auto",
                            group: dist.ProcessGroup | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``logit_divergence`` and, without gradient, the student's per-token cross-entropy
    against ``labels [...]`` (reported beside the distillation loss). On the fused path
    (forward KL, T=1, no top-k) the cross-entropy reuses the divergence's log-sum-exps."""
    if kind != "forward" or temperature != 1.0 or top_k is not None:
        kd = logit_divergence(student, teacher, kind=kind, temperature=temperature,
                              top_k=top_k, chunk_tokens=chunk_tokens, group=group)
        return kd, token_cross_entropy(student, labels, chunk_tokens=chunk_tokens, group=group)
    lead = student.shape[:-1]
    s2, t2 = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    step = chunk_rows(chunk_tokens, s2.shape[0], s2.shape[-1], s2.device)
    kd, ce = _VocabParallelDivergence.apply(s2, t2.detach(), kind, 1.0, None, group, step,
                                            labels.reshape(-1), _needs_grad(s2))
    return kd.reshape(lead), ce.reshape(lead)


@torch.no_grad()
def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *,
                        chunk_tokens: ChunkTokens = "auto",
                        group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Per-token cross-entropy ``[...]`` of vocab-parallel ``logits [..., V/TP]`` against
    ``labels [...]``, without gradient and without touching ``logits`` (Megatron's
    ``vocab_parallel_cross_entropy`` overwrites its input, which the divergence still needs):
    the student's LM loss, reported beside the distillation loss."""
    z2, y2 = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    step = chunk_rows(chunk_tokens, z2.shape[0], z2.shape[-1], z2.device)
    out = [vocab_parallel_lse(compute_dtype(z2[i:i + step]), group)
           - _pick(z2[i:i + step], y2[i:i + step], group)
           for i in range(0, z2.shape[0], step)]
    return torch.cat(out).reshape(labels.shape)


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor,
                      kind: Literal["cosine", "mse"] = "cosine") -> torch.Tensor:
    """Per-token loss ``[s, b]`` between hidden states ``[s, b, h]`` (student already projected
    to the teacher's width): ``1 - cos`` or the mean squared error over channels."""
    s, t = student.float(), teacher.float().detach()
    if kind == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1)
    return (s - t).pow(2).mean(-1)

"""Distillation losses, each with its shapes documented.

Logit divergence, vocab-parallel: under tensor parallelism every rank holds a ``[tokens, V/TP]``
slice of the student's and the teacher's logits. Softmax statistics (max, sum of exponentials)
and per-token sums are all-reduced over the TP group; the full vocabulary is never gathered.
The gradient is written by hand (``_VocabParallelDivergence``) because an all-reduce inside
autograd would need a matching all-reduce in backward for every statistic. Tokens are processed
in chunks (their size derived from the vocabulary slice and the device, ``chunk_rows``); forward KL
computes its gradient in the same pass, the other divergences recompute the chunk's softmaxes in
backward, so beyond the logits and their gradient memory stays at a few ``[chunk, V/TP]`` buffers.

Logits may arrive in any layout whose vocabulary rows are contiguous: the student's sequence-first
``[s, b, V/TP]`` as Megatron's output layer writes them beside the teacher's batch-first logits
seen through a transposed view. Where the token dimensions cannot be flattened without a copy,
chunks are taken along the first dimension instead (``_token_chunks``).

Temperature: both logits are divided by ``T`` and the divergence is multiplied by ``T^2``
(Hinton et al.), so gradient magnitudes do not shrink as ``T`` grows; at ``T=1`` nothing changes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist

from nemo_minitron.model.layouts import vocab_range

Divergence = Literal["forward", "reverse", "js", "gjsd"]
ChunkTokens = int | Literal["auto"] | None
"""Tokens per chunk of a logit loss: a number, None (all at once) or "auto" (``chunk_rows``)."""


def tp_allreduce(x: torch.Tensor, group: dist.ProcessGroup | None,
               op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if not one_process(group):
        dist.all_reduce(x, op=op, group=group)
    return x


def one_process(group: dist.ProcessGroup | None) -> bool:
    """Whether ``group`` (a TP group, None for none) spans one process: nothing to reduce."""
    return group is None or dist.get_world_size(group) == 1


def compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """fp32 for bf16/fp16/fp32 logits; fp64 stays fp64 (exact reference checks)."""
    return x if x.dtype == torch.float64 else x.float()


def log_softmax(z: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Vocab-parallel log-softmax of ``z [..., V/TP]`` (fp32). One process: torch's fused
    kernel (each row's passes stay in cache; 1.8x faster than ``z - logsumexp(z)`` on CPU), the
    single source of log-probabilities for the online and the cached teacher alike."""
    if one_process(group):
        return torch.log_softmax(z, -1)
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
    if one_process(group):
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
        if not one_process(group):
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, local.contiguous(), group=group)
            local = torch.cat(parts, dim=-1)
        kth = local.topk(top_k, dim=-1).values[:, -1:]
        t = t.masked_fill(t < kth, float("-inf"))
    return log_softmax(t, group)


def resolve_divergence(kind: Divergence, beta: float) -> tuple[Divergence, float]:
    """``(kind, beta)`` to compute: the generalized JSD at its ends is forward (beta=0) or
    reverse (beta=1) KL, as TRL's ``generalized_jsd_loss`` defines it; Jensen-Shannon is the
    generalized JSD at beta=0.5."""
    if kind == "gjsd" and beta in (0.0, 1.0):
        return ("forward" if beta == 0.0 else "reverse"), beta
    if kind == "js":
        return "gjsd", 0.5
    return kind, beta


def _divergence(ls: torch.Tensor, lt: torch.Tensor, kind: Divergence,
                group: dist.ProcessGroup | None,
                beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence ``[n]`` and ``dL/dz_student [n, V/TP]`` (per unit of loss) from
    student/teacher log-probs (``kind`` from ``resolve_divergence``). ``a`` is dL/dp_s; the
    softmax chain rule turns it into ``p_s * (a - sum_v p_s a)`` (the sum all-reduced)."""
    ps, pt = ls.exp(), lt.exp()
    if kind == "forward":  # KL(p_t || p_s)
        per = torch.special.xlogy(pt, pt) - torch.where(pt > 0, pt * ls, 0.0)
        return tp_allreduce(per.sum(-1), group), ps - pt
    if kind == "reverse":  # KL(p_s || p_t)
        a = ls - lt
        per = tp_allreduce((ps * a).sum(-1), group)
        return per, ps * (a - per.unsqueeze(-1))
    # Generalized JSD (TRL's convention): the mixture m = beta p_t + (1 - beta) p_s and
    # beta KL(p_t || m) + (1 - beta) KL(p_s || m); its dL/dp_s is (1 - beta)(log p_s - log m).
    lm = torch.logaddexp(ls + math.log(1.0 - beta), lt + math.log(beta))
    kl_sm = tp_allreduce((ps * (ls - lm)).sum(-1), group)
    kl_tm = tp_allreduce((torch.special.xlogy(pt, pt) - torch.where(pt > 0, pt * lm, 0.0)).sum(-1),
                       group)
    a = (1.0 - beta) * (ls - lm)
    return beta * kl_tm + (1.0 - beta) * kl_sm, ps * (a - (1.0 - beta) * kl_sm.unsqueeze(-1))


def _softmax_and_lse(z: torch.Tensor, group: dist.ProcessGroup | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocab-parallel ``softmax(z)`` (overwriting a temporary, one ``exp`` per element) and
    ``lse(z) [n]`` of ``z [n, V/TP]``; ``torch.logsumexp`` followed by ``exp(z - lse)`` would
    exponentiate every element twice."""
    m = tp_allreduce(z.max(dim=-1, keepdim=True).values, group, dist.ReduceOp.MAX)
    e = (z - m).exp_()
    total = tp_allreduce(e.sum(dim=-1, keepdim=True), group)
    return e.div_(total), (m + total.log()).squeeze(-1)


def _forward_kl_chunk(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor | None,
                      group: dist.ProcessGroup | None, grad_out: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``KL(p_t || p_s)`` per token of one chunk of logits ``[..., V/TP]``, the student's
    cross-entropy against ``labels`` (None without labels), and, into ``grad_out``, the
    gradient ``p_s - p_t``.

    One process: torch's fused ``log_softmax`` (each row's passes stay in cache), then
    ``KL = sum p_t (log p_t - log p_s)`` and ``CE = -log p_s[label]``. Under TP the softmax
    statistics are all-reduced: ``KL = sum p_t (z_t - z_s) - lse_t + lse_s``, ``CE = lse_s -
    z_s[label]``."""
    if one_process(group):
        lt, ls = log_softmax(zt, group), log_softmax(zs, group)
        pt = lt.exp()
        ce = None if labels is None else -ls.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        kl = torch.linalg.vecdot(pt, lt.sub_(ls))
        if grad_out is not None:
            torch.exp(ls, out=grad_out).sub_(pt)
        return kl, ce
    pt, lse_t = _softmax_and_lse(zt, group)
    ps, lse_s = _softmax_and_lse(zs, group)
    ce = None if labels is None else lse_s - _pick(zs, labels, group)
    kl = tp_allreduce(torch.linalg.vecdot(pt, zt - zs), group) - lse_t + lse_s
    if grad_out is not None:
        grad_out.copy_(ps.sub_(pt))
    return kl, ce


class _VocabParallelDivergence(torch.autograd.Function):
    """Per-token ``T^2 * D(teacher, student)`` of ``[n, ..., V/TP]`` logits, in chunks of
    ``step`` along the first dimension.

    Forward KL without top-k (the method's loss) is fused: one pass over each chunk computes
    both softmaxes, the divergence and its gradient ``p_s - p_t``, written into one
    logits-sized buffer that backward only scales; neither logits tensor is kept for backward.
    The other divergences recompute each chunk's softmaxes in backward (the loss adds the
    gradient buffer plus a few chunk-sized ones)."""

    @staticmethod
    def forward(ctx, student, teacher, kind, beta, temperature, top_k, group,  # type: ignore[override]
                step, labels, with_grad):
        out = torch.empty(student.shape[:-1], dtype=torch.float32
                          if student.dtype != torch.float64 else torch.float64,
                          device=student.device)
        fast = kind == "forward" and top_k is None
        if labels is not None and not (fast and temperature == 1.0):
            raise ValueError("the cross-entropy comes with forward KL at T=1 without top-k")
        ce = None if labels is None else torch.empty_like(out)
        # fp32 (for bf16 logits too): scaled in fp32 in backward, rounded once on the way out
        dstudent = torch.empty_like(student, dtype=out.dtype) if fast and with_grad else None
        with torch.no_grad():
            for i in range(0, student.shape[0], step):
                zs, zt = (compute_dtype(x[i:i + step]) for x in (student, teacher))
                if temperature != 1.0:
                    zs, zt = zs / temperature, zt / temperature
                if fast:
                    out[i:i + step], ce_i = _forward_kl_chunk(
                        zs, zt, None if labels is None else labels[i:i + step], group,
                        None if dstudent is None else dstudent[i:i + step])
                    if ce is not None:
                        ce[i:i + step] = ce_i
                else:
                    ls = log_softmax(zs, group)
                    lt = _teacher_log_probs(zt, top_k, group)
                    out[i:i + step] = _divergence(ls, lt, kind, group, beta)[0]
        if fast:
            ctx.dstudent = dstudent
        else:
            ctx.save_for_backward(student, teacher)
        ctx.args = (kind, beta, temperature, top_k, group, step, fast)
        if ce is not None:
            ctx.mark_non_differentiable(ce)
        return out * temperature**2, ce

    @staticmethod
    def backward(ctx, grad, _grad_ce=None):  # type: ignore[override]
        kind, beta, temperature, top_k, group, step, fast = ctx.args
        # d(T^2 D)/d logits = T^2 * dD/dz / T
        g = grad.unsqueeze(-1) * temperature
        if fast:  # dKL/dz_s = p_s - p_t, computed in forward
            if ctx.dstudent is None:
                raise RuntimeError("logit_divergence has no gradient to give: it ran under "
                                   "no_grad, or its backward already ran")
            dstudent, ctx.dstudent = ctx.dstudent.mul_(g), None
            return dstudent, *[None] * 9
        student, teacher = ctx.saved_tensors
        dstudent = torch.empty_like(student)
        for i in range(0, student.shape[0], step):
            ls = log_softmax(compute_dtype(student[i:i + step]) / temperature, group)
            lt = _teacher_log_probs(compute_dtype(teacher[i:i + step]) / temperature, top_k,
                                    group)
            _, dz = _divergence(ls, lt, kind, group, beta)
            del ls, lt
            dstudent[i:i + step] = dz.mul_(g[i:i + step])
        return dstudent, *[None] * 9


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


def _token_chunks(chunk_tokens: ChunkTokens, *xs: torch.Tensor
                  ) -> tuple[list[torch.Tensor], int]:
    """``xs`` (logits ``[..., V/TP]`` and per-token tensors of the same leading shape) arranged
    for chunking along their first dimension, and the chunk's length in that dimension.

    When every tensor's token dimensions flatten as a view, they are flattened (chunks of
    ``chunk_rows`` tokens). Otherwise (a transposed view, a vocabulary-padding slice) they keep
    their shape and a chunk is ``chunk_rows // prod(lead[1:])`` slices of the first dimension
    (at least one): nothing is copied."""
    logits = xs[0]
    lead = logits.shape[:-1]
    n, inner = math.prod(lead), math.prod(lead[1:])
    step = chunk_rows(chunk_tokens, n, logits.shape[-1], logits.device)
    try:
        flat = [x.view(n, *x.shape[len(lead):]) for x in xs]
    except RuntimeError:
        return list(xs), max(1, step // max(inner, 1))
    return flat, step


def _needs_grad(student: torch.Tensor) -> bool:
    """Whether the fused path should compute the gradient in forward (not under no_grad)."""
    return torch.is_grad_enabled() and student.requires_grad


def logit_divergence(student: torch.Tensor, teacher: torch.Tensor, *,
                     kind: Divergence = "forward", temperature: float = 1.0,
                     top_k: int | None = None, chunk_tokens: ChunkTokens = "auto",
                     group: dist.ProcessGroup | None = None, beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence between teacher and student logits.

    ``student``, ``teacher``: ``[..., V/TP]`` logits (this rank's vocabulary slice under TP;
    ``group`` is the TP group, None for one process). Returns ``[...]`` (fp32): forward
    ``KL(p_t || p_s)``, reverse ``KL(p_s || p_t)``, Jensen-Shannon or the generalized JSD
    with ``beta`` (``_divergence``; 0: forward, 1: reverse KL), times ``T^2``. ``top_k``
    (forward only) keeps the teacher's k most likely tokens, renormalised. ``chunk_tokens``
    bounds the temporary memory (None: one chunk; "auto": from the shapes, ``chunk_rows``)."""
    if top_k is not None and kind != "forward":
        raise ValueError("kd.top_k works with kd.divergence=forward only (the teacher's "
                         "truncated distribution has zeros)")
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits "
                         f"{tuple(teacher.shape)} differ")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    kind, beta = resolve_divergence(kind, beta)
    (s2, t2), step = _token_chunks(chunk_tokens, student, teacher.detach())
    out, _ = _VocabParallelDivergence.apply(s2, t2, kind, beta, temperature, top_k, group, step,
                                            None, _needs_grad(s2))
    return out.view(student.shape[:-1])


def logit_divergence_and_ce(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                            *, kind: Divergence = "forward", temperature: float = 1.0,
                            top_k: int | None = None, chunk_tokens: ChunkTokens = "auto",
                            group: dist.ProcessGroup | None = None, beta: float = 0.5
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``logit_divergence`` and, without gradient, the student's per-token cross-entropy
    against ``labels [...]`` (reported beside the distillation loss). On the fused path
    (forward KL, T=1, no top-k) the cross-entropy reuses the student's log-softmax."""
    if resolve_divergence(kind, beta)[0] != "forward" or temperature != 1.0 or top_k is not None:
        kd = logit_divergence(student, teacher, kind=kind, temperature=temperature,
                              top_k=top_k, chunk_tokens=chunk_tokens, group=group, beta=beta)
        return kd, token_cross_entropy(student, labels, chunk_tokens=chunk_tokens, group=group)
    (s2, t2, y2), step = _token_chunks(chunk_tokens, student, teacher.detach(), labels)
    kd, ce = _VocabParallelDivergence.apply(s2, t2, "forward", beta, 1.0, None, group, step, y2,
                                            _needs_grad(s2))
    return kd.view(labels.shape), ce.view(labels.shape)


@torch.no_grad()
def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *,
                        chunk_tokens: ChunkTokens = "auto",
                        group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Per-token cross-entropy ``[...]`` of vocab-parallel ``logits [..., V/TP]`` against
    ``labels [...]``, without gradient and without touching ``logits`` (Megatron's
    ``vocab_parallel_cross_entropy`` overwrites its input, which the divergence still needs):
    the student's LM loss, reported beside the distillation loss."""
    (z2, y2), step = _token_chunks(chunk_tokens, logits, labels)
    out = [vocab_parallel_lse(compute_dtype(z2[i:i + step]), group)
           - _pick(z2[i:i + step], y2[i:i + step], group)
           for i in range(0, z2.shape[0], step)]
    return torch.cat(out).view(labels.shape)


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor,
                      kind: Literal["cosine", "mse"] = "cosine") -> torch.Tensor:
    """Per-token loss ``[s, b]`` between hidden states ``[s, b, h]`` (student already projected
    to the teacher's width): ``1 - cos`` or the mean squared error over channels."""
    s, t = student.float(), teacher.float().detach()
    if kind == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1)
    return (s - t).pow(2).mean(-1)

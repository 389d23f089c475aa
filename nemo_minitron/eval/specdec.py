"""Speculative decoding: a draft model proposes ``K`` tokens, the target verifies them in one
forward pass (Leviathan et al. 2023; Chen et al. 2023).

**KV caches.** Both models keep a Megatron ``StaticInferenceContext``. Its key/value memory is
indexed by cache slot = absolute position: a forward of ``s`` tokens writes slots
``[sequence_len_offset, sequence_len_offset + s)`` and attends to slots
``[0, sequence_len_offset + s)``; RoPE is taken at those slots too. Rolling a cache back past a
rejection is therefore only ``sequence_len_offset = first stale position``: stale slots are
never read before they are overwritten. A multi-token step with the cache does *not* work as
megatron-core 0.16.1 runs it for decoding: once ``sequence_len_offset > 0`` attention drops its
causal mask (``AttnMaskType.no_mask``, right for one query token), and a static context
materializes only the last position's logits. Every forward here therefore passes an explicit
bottom-right causal mask (query ``i`` at position ``start + i`` sees slots ``<= start + i``),
which Megatron's local ``DotProductAttention`` applies, and turns
``materialize_only_last_token_logits`` off. Transformer Engine's attention ignores an explicit
mask under ``no_mask``: the ``specdec`` verb builds both models with the local spec (also on
GPU), and a model built with the TE spec is refused with a one-line error.

**Batches.** A static context has one offset for the whole batch, so the batch advances from
``c = min(committed length) - 1`` over the rows still generating. A row that accepted more
than the slowest row (or whose prompt is longer) keeps its tokens: they are *forced* in the
next window (fed to both models like prompt tokens, neither proposed nor counted), exactly as
``generate`` batches prompts of different lengths. Nothing accepted is thrown away; the cost is
that a row ahead of the slowest one proposes fewer new tokens per step (``K`` minus its lead),
so with a batch the tokens per target step fall toward those of the slowest row.

**Figures** (vLLM's definitions, per row and summed): acceptance rate = accepted / proposed
draft tokens; mean acceptance length = 1 + accepted / drafts, a draft being one verification
step in which the row proposed at least one token (the bonus or correction token counts as
the 1); conditional acceptance at position ``k`` = tokens accepted at draft position ``k`` /
drafts that reached position ``k`` (all of ``1..k-1`` accepted). The predicted speed-up
(Leviathan et al., eq. 1 of Theorem 3.8) for acceptance rate ``a``, ``K`` draft tokens and a
draft/target step-cost ratio ``c``: ``(1 - a^(K+1)) / ((1 - a) (K c + 1))`` (``(K+1)/(K c+1)``
at ``a = 1``); it assumes that verifying ``K+1`` tokens costs one target step and independent
acceptances.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from nemo_minitron.config import ConfigError
from nemo_minitron.eval.decode import KVCache, decode_steps
from nemo_minitron.eval.decode import forward_all as forward_all  # the verification forward
from nemo_minitron.eval.generate import SamplingConfig, filter_logits


@dataclass
class SpecStats:
    """Counters of one or more speculative runs (summed over rows)."""

    proposed: int = 0
    """Draft tokens proposed."""
    accepted: int = 0
    """Draft tokens accepted."""
    drafts: int = 0
    """Verification steps of a row in which it proposed at least one token."""
    emitted: int = 0
    """Tokens generated (accepted + correction/bonus)."""
    target_forwards: int = 0
    """Target forward passes (verifications; one per step for the whole batch)."""
    draft_forwards: int = 0
    """Draft forward passes."""
    reached: list[int] = field(default_factory=list)
    """Per draft position k = 1..K: drafts whose tokens at 1..k-1 were all accepted and that
    proposed a token at k."""
    accepted_at: list[int] = field(default_factory=list)
    """Per draft position k: tokens accepted there."""
    history: list[tuple[int, int, int]] = field(default_factory=list)
    """``(row, proposed, accepted)`` of every draft, in order."""

    def count_position(self, k: int, reached: int, accepted: int) -> None:
        while len(self.reached) <= k:
            self.reached.append(0)
            self.accepted_at.append(0)
        self.reached[k] += reached
        self.accepted_at[k] += accepted

    def figures(self) -> dict[str, Any]:
        """Acceptance rate, mean acceptance length and conditional acceptance by position."""
        return {
            "proposed": self.proposed, "accepted": self.accepted, "drafts": self.drafts,
            "acceptance_rate": self.accepted / self.proposed if self.proposed else 0.0,
            "mean_acceptance_length": 1 + self.accepted / self.drafts if self.drafts else 1.0,
            "acceptance_by_position": [a / r if r else None
                                       for a, r in zip(self.accepted_at, self.reached)],
            "tokens_per_target_forward": (self.emitted / self.target_forwards
                                          if self.target_forwards else 0.0),
        }


def predicted_speedup(alpha: float, k: int, cost_ratio: float) -> float:
    """Leviathan et al.'s expected speed-up ``(1 - a^(K+1)) / ((1 - a)(K c + 1))``."""
    tokens = k + 1 if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (k * cost_ratio + 1)


def check_local_attention(model: torch.nn.Module, what: str) -> None:
    """One-line error unless ``model`` attends with Megatron's local ``DotProductAttention``
    (the one that applies an explicit mask under a KV cache)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from nemo_minitron.model.build import unwrap

    # A heterogeneous layer's no-op or linear attention has no core attention.
    cores = [getattr(layer.self_attention, "core_attention", None)
             for layer in unwrap(model).decoder.layers]
    core = next((c for c in cores if c is not None and not isinstance(c, DotProductAttention)),
                None)
    if core is not None:
        raise ConfigError(f"{what}: speculative decoding needs Megatron's local attention "
                          f"(Transformer Engine's {type(core).__name__} ignores the "
                          "verification mask under a KV cache)")


def accept_draft(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor,
                 u: torch.Tensor) -> torch.Tensor:
    """Rejection rule: draft token ``x`` (drawn from ``q``) is kept with probability
    ``min(1, p[x] / q[x])``, i.e. when ``u * q[x] < p[x]`` for ``u ~ U[0, 1)``."""
    px = p.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    qx = q.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    return u * qx < px


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``normalize(max(p - q, 0))``, what a rejected position is resampled from (``p`` itself
    where the positive part vanishes, which a rejection never meets)."""
    r = (p - q).clamp_min(0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(1e-30), p)


def probs(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """The sampling distribution of ``logits`` (temperature, top-k, top-p of ``s``)."""
    return filter_logits(logits, s).softmax(-1)


def verify(target_logits: torch.Tensor, window: torch.Tensor, draft_probs: torch.Tensor | None,
           forced: torch.Tensor, proposed: torch.Tensor, s: SamplingConfig,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verify one window of ``n`` tokens per row.

    ``target_logits [B, n+1, V]``: the target's logits for window positions ``0..n`` (each
    predicted from the tokens before it); ``window [B, n]``: the tokens at positions
    ``0..n-1``; ``draft_probs [B, n, V]``: the draft's distributions there (sampling only);
    ``forced [B, n+1]``: positions already committed (accepted without a test);
    ``proposed [B, n]``: positions holding a draft proposal. Returns ``(ok, token, new)``: the
    number of leading positions accepted, the token at position ``ok`` (the correction of a
    rejected proposal, else drawn from the target) and whether position ``ok`` is new (not
    forced)."""
    n = window.shape[1]
    p = None if s.greedy else probs(target_logits, s)
    if p is None or n == 0:
        test = window == target_logits[:, :n].argmax(-1)
    else:
        assert draft_probs is not None
        u = torch.rand(window.shape, generator=gen)
        test = accept_draft(p[:, :n], draft_probs, window, u)
    accept = forced[:, :n] | (proposed & test)
    ok = accept.long().cumprod(1).sum(1)
    rows = torch.arange(window.shape[0])
    rejected = (ok < n) & proposed[rows, ok.clamp_max(n - 1)] if n else ok < 0
    if p is None:
        token = target_logits[rows, ok].argmax(-1)
    else:
        p_ok = p[rows, ok]
        if n:
            assert draft_probs is not None
            q_ok = draft_probs[rows, ok.clamp_max(n - 1)]
            p_ok = torch.where(rejected[:, None], residual(p_ok, q_ok), p_ok)
        token = torch.multinomial(p_ok, 1, generator=gen).squeeze(-1)
    return ok, token, ~forced[rows, ok]


def _masked(logits: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    if vocab_limit is not None:
        logits[..., vocab_limit:] = float("-inf")
    return logits


@torch.no_grad()
def speculative_generate(target: torch.nn.Module, draft: torch.nn.Module,
                         prompts: list[list[int]], sampling: SamplingConfig, draft_tokens: int,
                         vocab_limit: int | None = None,
                         stats: SpecStats | None = None) -> list[list[int]]:
    """Continuations of every prompt (without the prompts), as the target alone would produce
    them: token for token under greedy decoding, in distribution under sampling. Counters of
    acceptance go to ``stats``."""
    from megatron.core import parallel_state as ps

    if draft_tokens < 1:
        raise ConfigError(f"draft_tokens={draft_tokens}: K must be at least 1")
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ConfigError("speculative decoding runs with pipeline_model_parallel_size=1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    check_local_attention(target, "target")
    check_local_attention(draft, "draft")
    stats = SpecStats() if stats is None else stats
    k_max = draft_tokens
    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    final = lengths + sampling.max_new_tokens  # a row is done at this length
    cap = int(final.max()) + k_max + 2
    tokens = torch.zeros(b, cap, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    committed = lengths.clone()
    active = committed < final
    gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
    modes = (target.training, draft.training)
    target.eval()
    draft.eval()
    t_cache, d_cache = (KVCache(m, b, cap, masked=True) for m in (target, draft))
    rows = torch.arange(b)
    while bool(active.any()):
        c = int(committed[active].min()) - 1  # last position every active row has committed
        # Proposals at positions committed..final-2 (the bonus then ends the row at final-1).
        last = torch.minimum(final - 2 - c, torch.full_like(final, k_max))
        n = int(last[active].max().clamp(0, k_max))
        idx = torch.arange(n + 1)
        pos = c + 1 + idx  # positions of the window's predictions
        forced = pos[None] < committed[:, None]
        proposed = ~forced[:, :n] & (idx[None, :n] < last[:, None]) & active[:, None]
        q: torch.Tensor | None = None  # the draft's distributions (sampling)
        # The draft catches up from its valid slots, then proposes one token per step.
        for at, logits in decode_steps(d_cache, tokens, c + 1, c + 1 + n):
            logits = _masked(logits.cpu(), vocab_limit)
            stats.draft_forwards += 1
            if sampling.greedy:
                prop = logits.argmax(-1)
            else:
                qj = probs(logits, sampling)
                prop = torch.multinomial(qj, 1, generator=gen).squeeze(-1)
                q = qj[:, None] if q is None else torch.cat([q, qj[:, None]], 1)
            tokens[:, at] = torch.where(forced[:, at - c - 1], tokens[:, at], prop)
        t_off = t_cache.valid
        t_logits = t_cache.forward(tokens[:, :c + n + 1])[:, c - t_off:].cpu()
        t_logits = _masked(t_logits, vocab_limit)
        stats.target_forwards += 1
        ok, token, new = verify(t_logits, tokens[:, c + 1:c + 1 + n], q, forced, proposed,
                                sampling, gen)
        new &= active
        # Figures: per row, the proposals before the first rejection are accepted.
        acc = proposed & (idx[None, :n] < ok[:, None])
        stats.proposed += int(proposed.sum())
        stats.accepted += int(acc.sum())
        stats.drafts += int(proposed.any(1).sum())
        for i in proposed.any(1).nonzero().flatten().tolist():
            stats.history.append((i, int(proposed[i].sum()), int(acc[i].sum())))
        rank = proposed.long().cumsum(1) - 1  # draft position (0-based) of each proposal
        reached = proposed & (idx[None, :n] <= ok[:, None])  # every earlier one accepted
        for k in range(n):
            at = proposed & (rank == k)
            stats.count_position(k, int((at & reached).sum()), int((at & acc).sum()))
        start_len = committed.clone()
        tokens[rows[new], (c + 1 + ok)[new]] = token[new]
        committed = torch.where(new, c + 2 + ok, committed)
        stats.emitted += int((committed - start_len).clamp_min(0).sum())
        if sampling.stop_tokens:
            span = torch.arange(cap, device=tokens.device)[None]
            fresh = (span >= start_len[:, None]) & (span < committed[:, None])
            stops = torch.tensor(sampling.stop_tokens, device=tokens.device)
            active &= ~(torch.isin(tokens, stops) & fresh).any(1)
        active &= committed < final
        if bool(active.any()):
            # Roll back: slots up to the first position some active row changed stay valid.
            c_next = int(committed[active].min()) - 1
            for cache in (t_cache, d_cache):
                cache.valid = min(cache.valid, c_next)
    target.train(modes[0])
    draft.train(modes[1])
    out = []
    stop_set = set(sampling.stop_tokens or ())
    for i, (n0, n1) in enumerate(zip(lengths.tolist(), committed.tolist())):
        row = tokens[i, n0:min(n1, n0 + sampling.max_new_tokens)].tolist()
        # as generate: the row ends before its first stop token, which is not returned
        end = next((j for j, t in enumerate(row) if t in stop_set), len(row))
        out.append(row[:end])
    return out

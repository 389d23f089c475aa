"""The one KV-cache decode loop that ``generate``, ``bench`` and speculative decoding share.

``KVCache`` holds a model's Megatron ``StaticInferenceContext`` and how many positions of it
are valid; ``decode_steps`` walks positions one at a time, feeding the cache the tokens it has
not seen yet (the whole prefix at the first step, the prefill; one token after) and yielding
the logits that predict each position. The caller writes the token it picks into ``tokens``
before asking for the next step, and may stop at any step: ``generate`` samples and forces
prompt tokens, ``bench`` times the first step (prefill) apart from the rest, a speculative
draft proposes ``K`` tokens with it and then rolls the cache back (``KVCache.valid``).

Two forwards against the cache: Megatron's own (``masked=False``; a prefill, then decode mode,
one query token per step, the last position's logits only) and one with an explicit
bottom-right causal mask that returns every position's logits (``masked=True``, see
``forward_all``), which several new tokens per forward and a rollback need.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nemo_minitron.model.attention import bottom_right_causal


def sync() -> None:
    """Wait for the accelerator before reading a clock (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward_all(model: torch.nn.Module, tokens: torch.Tensor, start: int, ctx) -> torch.Tensor:
    """Logits ``[batch, s, vocab]`` of every position of ``tokens`` (positions ``start..``),
    written into ``ctx``'s cache at slots ``start..start+s-1`` (rolling it back to ``start``)."""
    b, s = tokens.shape
    pos = torch.arange(start, start + s, device=tokens.device).unsqueeze(0).expand(b, s)
    # Megatron's convention, True = masked: query i (slot start+i) sees slots 0..start+i only.
    mask = ~bottom_right_causal(s, start + s, tokens.device)
    ctx.sequence_len_offset = start
    ctx.materialize_only_last_token_logits = False
    out = model(tokens, pos, mask[None, None], inference_context=ctx,
                runtime_gather_output=True)
    ctx.sequence_len_offset = start + s
    return out.float()


class KVCache:
    """A model's static KV cache of ``batch`` rows and ``length`` positions, of which the
    first ``valid`` hold keys and values of the current tokens. ``enabled=False``: no cache,
    every forward recomputes the whole prefix (the reference the cache is tested against)."""

    def __init__(self, model: torch.nn.Module, batch: int, length: int, *,
                 masked: bool = False, enabled: bool = True) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model = model
        self.device = next(model.parameters()).device
        self.masked = masked
        self.ctx = StaticInferenceContext(batch, length) if enabled else None
        self.valid = 0
        """Positions ``0..valid-1`` are cached; lowering it rolls the cache back (stale slots
        are overwritten before they are read, as slots are absolute positions)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, s', vocab]`` predicting the positions after ``tokens[:, valid:]``
        (``tokens`` is the whole prefix): every position when ``masked``, else the last."""
        if self.ctx is None:
            return self._megatron(tokens.to(self.device), 0)
        new = tokens[:, self.valid:].to(self.device)  # only the new tokens cross to the device
        out = (forward_all(self.model, new, self.valid, self.ctx) if self.masked
               else self._megatron(new, self.valid))
        self.valid = tokens.shape[1]
        return out

    def _megatron(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        b, s = tokens.shape
        pos = torch.arange(start, start + s, device=tokens.device).unsqueeze(0).expand(b, s)
        out = self.model(tokens, pos, None, inference_context=self.ctx,
                         runtime_gather_output=True)
        if self.ctx is not None:
            self.ctx.sequence_len_offset = start + s
            self.ctx.enable_decode_mode()  # the prompt is in: one query token per step now
        return out[:, -1:]


def decode_steps(cache: KVCache, tokens: torch.Tensor, start: int,
                 end: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(pos, logits [batch, vocab])`` for ``pos = start..end-1``: the logits predicting
    position ``pos`` from ``tokens[:, :pos]``. Write ``tokens[:, pos]`` before the next step."""
    for pos in range(start, end):
        yield pos, cache.forward(tokens[:, :pos])[:, -1]

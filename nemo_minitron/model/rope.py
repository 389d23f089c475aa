"""Rotary position embedding without concatenations: Megatron's numbers in fewer passes.

megatron-core's unfused RoPE (``rope_utils._apply_rotary_pos_emb_bshd``, used wherever
Transformer Engine's fused kernel is not: on CPU, and on GPU without ``apply_rope_fusion``)
computes ``t * cos + rotate_half(t) * sin`` with ``rotate_half(t) = cat(-t2, t1)``, then
concatenates ``t`` with its (empty) unrotated tail: two concatenations and five elementwise
passes per query and per key of every layer, reading the strided views the QKV split leaves,
and in backward a third concatenation that undoes ``rotate_half``'s chunking. On CPU the
concatenations alone were 3% of a demo-shape training step.

``apply_rope`` writes each half of the output once, ``[t1 c1 - t2 s1, t2 c2 + t1 s2]``, and its
backward applies the transposed rotation, ``[g1 c1 + g2 s2, g2 c2 - g1 s1]``. Every element is
the same products and the same single addition as Megatron's expression and its autograd
(``a + (-b)`` is ``a - b`` in floating point), with ``cos``/``sin`` computed as Megatron computes
them: outputs and gradients are bit-identical (``tests/model/test_attention.py``).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


def rope_applies(config: TransformerConfig, t: torch.Tensor, freqs: torch.Tensor,
                 mscale: float) -> bool:
    """Whether ``apply_rope`` computes what Megatron's RoPE would for ``t`` and ``freqs``: plain
    (non-interleaved, no MLA, no yarn scale), unfused, rotating the whole head."""
    return (not config.apply_rope_fusion and not config.rotary_interleaved
            and not config.multi_latent_attention and mscale == 1.0
            and freqs.shape[-1] == t.shape[-1] and t.shape[-1] % 2 == 0)


def rope_tables(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of the angles ``freqs`` in ``dtype``, as Megatron computes them; one pair
    serves every tensor rotated at those angles (a layer's queries and keys)."""
    return torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)


def apply_rope(t: torch.Tensor, freqs: torch.Tensor,
               tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """RoPE of ``t [s, b, heads, d]`` at the angles ``freqs [s, 1, 1, d]`` (Megatron's rotary
    embedding, halves repeated), or at the given ``rope_tables`` of those angles; a new
    contiguous tensor."""
    cos, sin = tables if tables is not None else rope_tables(freqs, t.dtype)
    if torch.is_grad_enabled():
        return _Rope.apply(t, cos, sin)
    # Nothing to record: the forward without the autograd Function's per-call cost (decode).
    return _rotate_forward(t, cos, sin)


def _rotate_forward(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``[t1 c1 - t2 s1, t2 c2 + t1 s2]``: the rotation itself."""
    c1, c2 = cos.chunk(2, -1)
    s1, s2 = sin.chunk(2, -1)
    return _rotate(t, c1, s1, c2, s2, sign=-1.0)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, cos, sin):  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _rotate_forward(t, cos, sin)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        c1, c2 = cos.chunk(2, -1)
        s1, s2 = sin.chunk(2, -1)
        # The transposed rotation: [g1 c1 + g2 s2, g2 c2 - g1 s1].
        return _rotate(grad, c1, s2, c2, s1, sign=1.0), None, None


def _rotate(x: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor,
            b2: torch.Tensor, sign: float) -> torch.Tensor:
    """``[x1 a1 + sign x2 b1, x2 a2 - sign x1 b2]`` of ``x = [x1, x2]`` (halves of the last
    dimension), into one new contiguous tensor."""
    x1, x2 = x.chunk(2, -1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, -1)
    tmp = torch.mul(x2, b1)
    torch.mul(x1, a1, out=o1)
    torch.mul(x2, a2, out=o2)
    if sign > 0:
        o1.add_(tmp)
        o2.sub_(torch.mul(x1, b2, out=tmp))
    else:
        o1.sub_(tmp)
        o2.add_(torch.mul(x1, b2, out=tmp))
    return out

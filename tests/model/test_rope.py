"""``model.rope.apply_rope`` against megatron-core's own unfused RoPE on the same inputs:
bit-identical outputs and input gradients (fp32 and bf16, strided inputs as the QKV split
leaves them; outputs also without autograd and from shared ``rope_tables``), and
``rope_applies`` declining what it does not compute."""

from __future__ import annotations

import copy

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_minitron.model.rope import apply_rope, rope_applies, rope_tables


def _freqs(s: int, d: int) -> torch.Tensor:
    """Megatron's rotary angles ``[s, 1, 1, d]``: position x inverse frequency, halves repeated."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    f = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    return torch.cat([f, f], -1)[:, None, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_megatron_forward_and_backward(dtype):
    s, b, heads, d = 7, 3, 4, 16
    g = torch.Generator().manual_seed(0)
    # A strided view, as query/key come out of the fused QKV projection.
    qkv = torch.randn(s, b, heads, 3 * d, generator=g).to(dtype)
    freqs = _freqs(s, d)
    grad = torch.randn(s, b, heads, d, generator=g).to(dtype)
    outs = []
    for fn in (lambda t: apply_rope(t, freqs), lambda t: _apply_rotary_pos_emb_bshd(t, freqs)):
        leaf = qkv.clone().requires_grad_(True)
        t = leaf[..., d:2 * d]
        assert not t.is_contiguous()
        out = fn(t)
        out.backward(grad)
        outs.append((out.detach(), leaf.grad))
    (got, got_grad), (want, want_grad) = outs
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, want)
    assert torch.equal(got_grad, want_grad)
    # Not the identity: position 0 is unrotated, later positions are.
    k = qkv[..., d:2 * d]
    assert torch.equal(got[0], k[0]) and not torch.equal(got[1:], k[1:])
    # Without autograd (decode: no Function), and with cos/sin shared between tensors.
    with torch.no_grad():
        assert torch.equal(apply_rope(k, freqs), want)
        assert torch.equal(apply_rope(k, freqs, rope_tables(freqs, dtype)), want)


def test_rope_applies_only_where_it_computes_megatrons_rope():
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4)
    t, freqs = torch.zeros(2, 1, 4, 16), _freqs(2, 16)
    assert rope_applies(cfg, t, freqs, 1.0)
    assert not rope_applies(cfg, t, freqs, 1.2)  # yarn's attention scale
    assert not rope_applies(cfg, t, freqs[..., :8], 1.0)  # partial rotary
    for field in ("rotary_interleaved", "apply_rope_fusion", "multi_latent_attention"):
        other = copy.copy(cfg)  # set after validation: fusion needs Transformer Engine
        setattr(other, field, True)
        assert not rope_applies(other, t, freqs, 1.0), field

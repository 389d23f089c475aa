"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), and a
self-attention whose KV cache holds keys with RoPE applied (``RopeCachedSelfAttention``).

A drop-in for megatron-core's local ``DotProductAttention`` (same constructor, same
``forward`` signature, same ``[s, b, heads, head_dim]`` inputs and ``[sq, b, hp]`` output, no
parameters, so checkpoints are identical). Megatron's local path materialises the ``[b*np, sq,
sk]`` score matrix (``baddbmm``), masks and softmaxes it and repeats keys/values for GQA; SDPA
runs a fused kernel (flash attention on CPU, skipping masked-out blocks of a causal mask) and
reads grouped keys/values in place (``enable_gqa``).

Masks, with Megatron's convention (a boolean ``attention_mask`` is True where attention is
masked OUT; SDPA's boolean masks are True where it is kept):

* an explicit ``attention_mask`` (packed SFT's block-diagonal mask, speculative decoding's
  verification mask) is applied as given, broadcast over heads;
* otherwise, with the spec's causal mask type: ``sq == sk`` (training, prefill) is SDPA's
  ``is_causal``; ``sq == 1`` (KV-cache decode) needs no mask; ``1 < sq < sk`` (several new
  tokens against a KV cache) gets the bottom-right aligned causal mask, query ``i`` seeing keys
  ``<= sk - sq + i`` (SDPA's ``is_causal`` is top-left aligned; Megatron's local attention
  asserts here instead).

A query whose every key is masked gets a zero output here and the mean of all values from the
local module (its masked scores are -10000, not -inf); no caller builds such a row (packed
SFT's and speculative decoding's masks always keep a token's own position).

As in the local module, the ``attn_mask_type`` argument of ``forward`` is ignored (Megatron
passes ``no_mask`` whenever a KV cache is past its prompt, which is only right for one query).
Under tensor parallelism every rank attends with its own heads; nothing here assumes TP=1.
Attention dropout, sliding windows, non-vanilla softmax, packed ``thd`` sequences and attention
bias are refused (none is used by this project).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import (
    SelfAttention,
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor

from nemo_minitron.config import ConfigError
from nemo_minitron.model.rope import apply_rope, rope_applies, rope_tables


def bottom_right_causal(sq: int, sk: int, device: torch.device) -> Tensor:
    """SDPA keep-mask ``[sq, sk]``: query ``i`` (the ``i``-th of the last ``sq`` positions)
    sees keys ``0 .. sk - sq + i``."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)


class SDPAttention(DotProductAttention):
    """Megatron's ``DotProductAttention`` computed by torch's fused SDPA kernel."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if self.attention_dropout.p > 0:
            raise ConfigError(f"attention_dropout={self.attention_dropout.p}: SDPA attention "
                              "supports no attention dropout; use attention='local'")
        if config.softmax_type != "vanilla":
            raise ConfigError(f"softmax_type={config.softmax_type!r}: SDPA attention supports "
                              "only 'vanilla'; use attention='local'")
        if self.scale_mask_softmax.window_size is not None:
            raise ConfigError("window_size: SDPA attention supports no sliding-window "
                              "attention; use attention='local'")
        # The local module divides its scale by the layer number under query-key layer scaling
        # and multiplies the scores back inside the softmax: the net scale is the plain one.
        coeff = self.layer_number if config.apply_query_key_layer_scaling else 1
        self.sdpa_scale = self.softmax_scale * coeff

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                attention_mask: Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: Tensor | None = None, packed_seq_params=None) -> Tensor:
        """``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]`` (``ng`` divides
        ``np``), ``attention_mask`` boolean, True = masked out, broadcastable to
        ``[b, np, sq, sk]``. Returns ``[sq, b, np * hn]``."""
        if packed_seq_params is not None:
            raise ValueError("SDPA attention does not take packed_seq_params (thd); pass a "
                             "block-diagonal attention_mask instead")
        if attention_bias is not None:
            raise ValueError("SDPA attention does not take an attention_bias")
        sq, b, heads, hn = query.shape
        sk = key.size(0)
        if sq > sk:
            raise ValueError(f"{sq} queries attend to {sk} keys: fewer keys than queries")
        mask, causal = None, False
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise TypeError(f"attention_mask must be boolean (True = masked out), got "
                                f"{attention_mask.dtype}")
            mask = ~attention_mask
        elif self.attn_mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk:
                causal = True
            else:
                mask = bottom_right_causal(sq, sk, query.device)
        # [s, b, h, d] -> [b, h, s, d] as strided views: the CPU flash kernel reads strides.
        out = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
            attn_mask=mask, is_causal=causal, scale=self.sdpa_scale,
            enable_gqa=key.size(2) != heads)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


class RopeCachedSelfAttention(SelfAttention):
    """Megatron's ``SelfAttention`` whose static KV cache holds keys with RoPE applied, and whose
    RoPE runs without concatenations (``model.rope``).

    megatron-core 0.16's static-batching cache stores keys before RoPE, so every decode step
    re-applies RoPE to the whole cached key tensor of every layer (``context x batch x groups x
    kv_channels`` elements of mul/neg/cat per token): a cost that does not shrink when hidden or
    FFN sizes are pruned, measured as the main reason decode speed-ups fell short of the FLOP
    ratio on CPU (``nemo-minitron bench --profile``). Here RoPE is applied to the new keys at
    their own positions before they are stored, and only the queries get it afterwards, as
    Megatron's dynamic-batching cache and ``flash_decode`` do. RoPE is elementwise per position,
    so the cached keys, and so the logits, are the same numbers as before
    (``tests/model/test_attention.py``: bit-identical).

    Queries and keys are rotated here, in the hook Megatron's ``forward`` calls just before its
    own RoPE (which then finds nothing left to do), with ``apply_rope`` where it computes what
    Megatron's would (``rope_applies``), else with Megatron's function. Dynamic batching and
    ``flash_decode`` take Megatron's own path. Packed ``thd`` sequences (per-sequence positions
    from ``cu_seqlens``, which this hook does not see) never reach it: both core attentions of
    the local spec refuse ``packed_seq_params``."""

    def _adjust_key_value_for_inference(self, inference_context, query, key, value,
                                        rotary_pos_emb, *args, **kwargs):
        if rotary_pos_emb is None or self.config.flash_decode or (
                inference_context is not None and not inference_context.is_static_batching()):
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        if inference_context is None:  # training, or a forward without a KV cache
            query, key = self._rope_pair(query, key, q_pos_emb, k_pos_emb)
            return query, key, value, None, self.attn_mask_type, None
        start = inference_context.sequence_len_offset
        end = start + key.size(0)
        query, key = self._rope_pair(query, key, q_pos_emb, k_pos_emb, start, end)
        query, key, value, _, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, None, *args, **kwargs)
        return query, key, value, None, mask_type, block_table

    def _rope_pair(self, query: Tensor, key: Tensor, q_freqs: Tensor | None,
                   k_freqs: Tensor | None, start: int = 0, end: int | None = None
                   ) -> tuple[Tensor, Tensor]:
        """Queries and keys rotated at the angles ``[start:end]`` of their frequencies."""
        if q_freqs is k_freqs and self._rope_is_ours(key, k_freqs):
            # Self-attention: queries and keys at the same positions share cos and sin.
            freqs = k_freqs[start:end]
            tables = rope_tables(freqs, key.dtype)
            return apply_rope(query, freqs, tables), apply_rope(key, freqs, tables)
        return (self._rope(query, None if q_freqs is None else q_freqs[start:end]),
                self._rope(key, None if k_freqs is None else k_freqs[start:end]))

    def _rope_is_ours(self, t: Tensor, freqs: Tensor | None) -> bool:
        return freqs is not None and rope_applies(
            self.config, t, freqs, _yarn_get_concentration_factor_from_config(self.config))

    def _rope(self, t: Tensor, freqs: Tensor | None) -> Tensor:
        if freqs is None:
            return t
        if self._rope_is_ours(t, freqs):
            return apply_rope(t, freqs)
        mscale = _yarn_get_concentration_factor_from_config(self.config)
        return apply_rotary_pos_emb(t, freqs, config=self.config, mscale=mscale,
                                    cp_group=self.pg_collection.cp)

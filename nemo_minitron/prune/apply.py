"""Slice every weight that touches a pruned unit, build the smaller ``GPTModel`` fresh and load
the sliced weights into it.

The full (TP=1) tensors are sliced with the layouts of ``model.layouts`` (fused QKV, SwiGLU
``[gate; up]``, per-head ``linear_proj`` columns). Norms are separate modules in the local spec
(``input_layernorm``, ``pre_mlp_layernorm``) or fused into the next linear in the TE spec
(``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); both spellings are
handled.

RMSNorm rescaling: dropping channels changes the root-mean-square denominator. If the dropped
channels carried nothing, ``rms' = rms * sqrt(H / H')``; multiplying the kept norm weights by
``sqrt(H / H')`` restores the original outputs exactly (on by default). LayerNorm also
re-centres, which no weight rescale can undo, so it is left alone. The epsilon inside the root
is scaled by ``H / H'`` in the pruned config (``prune.plan``), which makes the compensation exact.
"""

from __future__ import annotations

import math

import torch

from nemo_minitron.config import ConfigError
from nemo_minitron.model import layouts
from nemo_minitron.model.build import build_model, unwrap
from nemo_minitron.model.full_state import gather_full_state_dict, load_full_state_dict
from nemo_minitron.model.params import count_params
from nemo_minitron.prune.plan import PrunePlan

_NORMS = ("input_layernorm.weight", "input_layernorm.bias", "pre_mlp_layernorm.weight",
          "pre_mlp_layernorm.bias", "self_attention.linear_qkv.layer_norm_weight",
          "self_attention.linear_qkv.layer_norm_bias", "mlp.linear_fc1.layer_norm_weight",
          "mlp.linear_fc1.layer_norm_bias")


def _qkv_rows(plan: PrunePlan, layer: int) -> torch.Tensor:
    """Row indices of the kept q/k/v blocks in the source ``linear_qkv``."""
    return layouts.qkv_rows(plan.source, plan.num_query_groups[layer].tolist(),
                            plan.num_attention_heads[layer].tolist())


def _proj_cols(plan: PrunePlan, layer: int) -> torch.Tensor:
    return layouts.proj_head_cols(plan.source, plan.num_attention_heads[layer].flatten().tolist())


def prune_state_dict(sd: dict[str, torch.Tensor], plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Full (TP=1, PP=1; ``model.full_state``) state dict of the source -> that of the pruned
    model."""
    src, hid = plan.source, plan.hidden_size
    scale = math.sqrt(src.hidden_size / plan.config.hidden_size) if plan.rescale_norms else 1.0
    renumber = {old: new for new, old in enumerate(plan.layers)}
    out: dict[str, torch.Tensor] = {}
    for key, w in sd.items():
        if key.endswith("_extra_state"):
            continue
        parsed = layouts.split_layer_key(key)
        if parsed is None:
            if key in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                       "output_layer.weight"):
                out[key] = w[:, hid]
            elif key == "decoder.final_layernorm.weight":
                out[key] = w[hid] * scale
            elif key == "decoder.final_layernorm.bias":
                out[key] = w[hid]
            else:
                raise ConfigError(f"pruning does not know the weight {key!r}")
            continue
        layer, name = parsed
        if layer not in renumber:
            continue
        new_key = layouts.layer_key(renumber[layer], name)
        if name in _NORMS:
            out[new_key] = w[hid] * (scale if name.endswith("weight") else 1.0)
        elif name == "self_attention.linear_qkv.weight":
            out[new_key] = w[_qkv_rows(plan, layer)][:, hid]
        elif name == "self_attention.linear_qkv.bias":
            out[new_key] = w[_qkv_rows(plan, layer)]
        elif name == "self_attention.linear_proj.weight":
            out[new_key] = w[hid][:, _proj_cols(plan, layer)]
        elif name in ("self_attention.linear_proj.bias", "mlp.linear_fc2.bias"):
            out[new_key] = w[hid]
        elif name in layouts.FC1:
            rows = layouts.fc1_rows(src, plan.ffn_hidden_size[layer])
            out[new_key] = w[rows][:, hid] if w.dim() == 2 else w[rows]
        elif name == "mlp.linear_fc2.weight":
            out[new_key] = w[hid][:, plan.ffn_hidden_size[layer]]
        else:
            raise ConfigError(f"pruning does not know the weight {key!r}")
    return {k: v.contiguous().clone() for k, v in out.items()}


def prune_model(model: torch.nn.Module, plan: PrunePlan) -> torch.nn.Module:
    """Build the pruned ``GPTModel`` under the current TP/PP layout and load the sliced weights;
    check that its parameter count equals the count predicted from its config.

    Under TP/PP the source is gathered to its full TP=1 state dict, sliced, and re-split evenly
    (``model.full_state``): every rank holds a balanced shard of the kept units, and the kept
    layers are spread evenly over the pipeline stages."""
    src = unwrap(model)
    full = gather_full_state_dict(src)
    have, want = sum(v.numel() for v in full.values()), count_params(plan.source)
    if have != want:  # e.g. a user's GPTModel with learned positions, described as RoPE
        raise ConfigError(f"the model holds {have} parameters, the plan's source config "
                          f"describes {want}: it is not this model's config (GPTModel's own "
                          f"arguments, e.g. position_embedding_type="
                          f"{plan.source.position_embedding_type!r}, vocab_size, "
                          f"share_embeddings_and_output_weights, go to "
                          f"ModelConfig.from_transformer_config)")
    new_sd = prune_state_dict(full, plan)
    predicted = count_params(plan.config)
    sliced = sum(v.numel() for v in new_sd.values())
    if sliced != predicted:
        raise AssertionError(f"pruned weights hold {sliced} parameters, config predicts "
                             f"{predicted}")
    pruned = build_model(plan.config, bf16=next(src.parameters()).dtype == torch.bfloat16)
    load_full_state_dict(pruned, new_sd, plan.config)
    return pruned

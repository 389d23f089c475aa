"""Slice every weight that touches a pruned unit, build the smaller ``GPTModel`` fresh and load
the sliced weights into it.

Megatron's layouts at TP=1 (the full tensors this module slices):
- ``linear_qkv`` rows are grouped per query group: ``[q heads of group 0 | k0 | v0 | q heads of
  group 1 | k1 | v1 | ...]``, each block ``kv_channels`` rows per head;
- SwiGLU ``linear_fc1`` rows are ``[gate (ffn) ; up (ffn)]``;
- norms are separate modules in the local spec (``input_layernorm``, ``pre_mlp_layernorm``) or
  fused into the next linear in the TE spec (``linear_qkv.layer_norm_weight``,
  ``linear_fc1.layer_norm_weight``); both spellings are handled.

RMSNorm rescaling: dropping channels changes the root-mean-square denominator. If the dropped
channels carried nothing, ``rms' = rms * sqrt(H / H')``; multiplying the kept norm weights by
``sqrt(H / H')`` restores the original outputs exactly (on by default). LayerNorm also
re-centres, which no weight rescale can undo, so it is left alone. The epsilon inside the root
is scaled by ``H / H'`` in the pruned config (``prune.plan``), which makes the compensation exact.
"""

from __future__ import annotations

import math
import re

import torch

from nemo_minitron.config import ConfigError
from nemo_minitron.model.build import build_model, unwrap
from nemo_minitron.model.full_state import gather_full_state_dict, load_full_state_dict
from nemo_minitron.model.params import count_params
from nemo_minitron.prune.plan import PrunePlan

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_NORMS = ("input_layernorm.weight", "input_layernorm.bias", "pre_mlp_layernorm.weight",
          "pre_mlp_layernorm.bias", "self_attention.linear_qkv.layer_norm_weight",
          "self_attention.linear_qkv.layer_norm_bias", "mlp.linear_fc1.layer_norm_weight",
          "mlp.linear_fc1.layer_norm_bias")


def _qkv_rows(plan: PrunePlan, layer: int) -> torch.Tensor:
    """Row indices of the kept q/k/v blocks in the source ``linear_qkv`` (TP=1 layout)."""
    src = plan.source
    d, per_group = src.head_dim, src.num_attention_heads // src.query_groups
    block = (per_group + 2) * d
    rows = []
    for g, heads in zip(plan.groups[layer].tolist(), plan.heads[layer].tolist()):
        base = g * block
        for h in heads:
            j = h - g * per_group  # position of the head inside its group
            rows.append(torch.arange(base + j * d, base + (j + 1) * d))
        rows.append(torch.arange(base + per_group * d, base + block))  # k and v
    return torch.cat(rows)


def _proj_cols(plan: PrunePlan, layer: int) -> torch.Tensor:
    d = plan.source.head_dim
    heads = plan.heads[layer].flatten().tolist()
    return torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])


def prune_state_dict(sd: dict[str, torch.Tensor], plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Full (TP=1, PP=1; ``model.full_state``) state dict of the source -> that of the pruned
    model."""
    src, hid = plan.source, plan.hidden
    scale = math.sqrt(src.hidden_size / plan.config.hidden_size) if plan.rescale_norms else 1.0
    ffn = src.ffn_hidden_size
    renumber = {old: new for new, old in enumerate(plan.layers)}
    out: dict[str, torch.Tensor] = {}
    for key, w in sd.items():
        if key.endswith("_extra_state"):
            continue
        m = _LAYER.match(key)
        if m is None:
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
        layer, name = int(m.group(1)), m.group(2)
        if layer not in renumber:
            continue
        new_key = f"decoder.layers.{renumber[layer]}.{name}"
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
        elif name in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
            keep = plan.ffn[layer]
            rows = torch.cat([keep, keep + ffn]) if src.activation == "swiglu" else keep
            out[new_key] = w[rows][:, hid] if w.dim() == 2 else w[rows]
        elif name == "mlp.linear_fc2.weight":
            out[new_key] = w[hid][:, plan.ffn[layer]]
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
    new_sd = prune_state_dict(gather_full_state_dict(src), plan)
    predicted = count_params(plan.config)
    sliced = sum(v.numel() for v in new_sd.values())
    if sliced != predicted:
        raise AssertionError(f"pruned weights hold {sliced} parameters, config predicts "
                             f"{predicted}")
    pruned = build_model(plan.config, bf16=next(src.parameters()).dtype == torch.bfloat16)
    load_full_state_dict(pruned, new_sd, plan.config)
    return pruned

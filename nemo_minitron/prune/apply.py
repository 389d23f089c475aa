"""Slice every weight that touches a pruned unit into a smaller model of the user's own class and
layer spec (``model.rebuild``), one layer at a time (``model.stream``).

``prune_model`` works on any megatron-core ``GPTModel`` (or subclass) whose layers hold only
the tensors below and the MoE layer's (router, experts, shared expert: ``prune.moe``);
everything else (grouped-GEMM experts, multi-latent attention, q/k norms, multi-token
prediction) is refused before anything is built, naming the module.

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
from typing import Any

import torch

from nemo_minitron.config import ConfigError
from nemo_minitron.model import layouts
from nemo_minitron.model.build import unwrap
from nemo_minitron.model.params import (
    count_params,
    model_sum,
    same_weights,
    weights_fingerprint,
)
from nemo_minitron.model.rebuild import Build, rebuild, replace_config
from nemo_minitron.model.stream import fill_others, stream_layers
from nemo_minitron.prune import moe
from nemo_minitron.prune.hetero import block_of, fill_layers, hetero_build, linear_weights
from nemo_minitron.prune.plan import PrunePlan, Target, validate_target

_NORMS = ("input_layernorm.weight", "input_layernorm.bias", "pre_mlp_layernorm.weight",
          "pre_mlp_layernorm.bias", "self_attention.linear_qkv.layer_norm_weight",
          "self_attention.linear_qkv.layer_norm_bias", "mlp.linear_fc1.layer_norm_weight",
          "mlp.linear_fc1.layer_norm_bias")
LAYER_TENSORS = (*_NORMS, *layouts.QKV, "self_attention.linear_proj.weight",
                 "self_attention.linear_proj.bias", *layouts.FC1, "mlp.linear_fc2.weight",
                 "mlp.linear_fc2.bias")
"""Layer-local tensors pruning knows how to slice."""
OTHER_TENSORS = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                 "output_layer.weight", "decoder.final_layernorm.weight",
                 "decoder.final_layernorm.bias")
"""Tensors outside the layers pruning knows how to slice."""


def _qkv_rows(plan: PrunePlan, layer: int) -> torch.Tensor:
    """Row indices of the kept q/k/v blocks in the source ``linear_qkv``."""
    return layouts.qkv_rows(plan.source, plan.kept_groups[layer].tolist(),
                            plan.kept_heads[layer].tolist())


def _proj_cols(plan: PrunePlan, layer: int) -> torch.Tensor:
    return layouts.proj_head_cols(plan.source, plan.kept_heads[layer].flatten().tolist())


def _norm_scale(plan: PrunePlan) -> float:
    return (math.sqrt(plan.source.hidden_size / plan.config.hidden_size)
            if plan.rescale_norms else 1.0)


def prune_other(key: str, w: torch.Tensor, plan: PrunePlan) -> torch.Tensor:
    """A tensor outside the layers (``OTHER_TENSORS``), full or one TP rank's shard (only the
    hidden dimension is sliced, which no vocab-parallel weight is split along)."""
    hid = plan.kept_hidden
    if key in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
               "output_layer.weight"):
        return w[:, hid].contiguous()
    if key == "decoder.final_layernorm.weight":
        return w[hid] * _norm_scale(plan)
    if key == "decoder.final_layernorm.bias":
        return w[hid].contiguous()
    raise ConfigError(f"pruning does not know the weight {key!r}")


def prune_layer(full: dict[str, torch.Tensor], plan: PrunePlan,
                layer: int) -> dict[str, torch.Tensor]:
    """The full (TP=1) tensors of source layer ``layer`` by layer-local name (all of them or
    any subset: each rule reads one weight) -> the pruned layer's. The one owner of the
    per-weight slicing rules. In a heterogeneous plan each layer has its own sizes (its kept
    units) and a block that is not full loses its tensors; a linear block's fitted weights
    come with its norm's weight (``prune.hetero``)."""
    hid, scale = plan.kept_hidden, _norm_scale(plan)
    ffn = plan.kept_ffn.get(layer)  # None in an MoE layer
    shape = plan.config.layer_shape(plan.kept_layers.index(layer))
    out: dict[str, torch.Tensor] = {}
    for name, w in full.items():
        sub = block_of(name)
        kind = getattr(shape, sub) if sub else "full"
        if kind == "no_op":
            continue  # the block and its norm are gone
        if sub == "mlp" and name.startswith("mlp.") and layer in plan.trained:
            out[name] = plan.trained[layer][name]  # trained after the cut (local distillation)
            continue
        if kind == "linear":  # its norm stays; the fitted linear comes with the norm's weight
            if name.startswith(("input_layernorm.", "pre_mlp_layernorm.")):
                out[name] = w[hid] * (scale if name.endswith("weight") else 1.0)
                if name.endswith("weight"):
                    out.update(linear_weights(plan.linear, layer, sub))
            continue
        if name in _NORMS:
            out[name] = w[hid] * (scale if name.endswith("weight") else 1.0)
        elif name == "self_attention.linear_qkv.weight":
            out[name] = w[_qkv_rows(plan, layer)][:, hid]
        elif name == "self_attention.linear_qkv.bias":
            out[name] = w[_qkv_rows(plan, layer)]
        elif name == "self_attention.linear_proj.weight":
            out[name] = w[hid][:, _proj_cols(plan, layer)]
        elif name in ("self_attention.linear_proj.bias", "mlp.linear_fc2.bias"):
            out[name] = w[hid]
        elif name in layouts.FC1:
            rows = layouts.fc1_rows(plan.source, ffn)
            out[name] = w[rows][:, hid] if w.dim() == 2 else w[rows]
        elif name == "mlp.linear_fc2.weight":
            out[name] = w[hid][:, ffn]
        elif moe.is_moe_tensor(name):
            out[name] = moe.slice_moe(name, w, plan.source, hid, plan.kept_experts[layer],
                                      plan.kept_expert_ffn[layer],
                                      plan.kept_shared_ffn.get(layer))
        else:
            key = layouts.layer_key(layer, name)
            raise ConfigError(f"pruning does not know the weight {key!r}")
    return {k: v.contiguous() for k, v in out.items()}


_KNOWN_MODULES = ("SelfAttention", "MLP", "MoELayer", "SequentialMLP", "SharedExpertMLP",
                  "TopKRouter")
"""Modules whose tensors pruning slices (``check_supported`` names what is inside others)."""


def check_supported(model: torch.nn.Module) -> None:
    """One-line error naming the first module of ``model`` that pruning cannot slice."""
    supported = ("supported: GPTModel layers of SelfAttention (linear_qkv, linear_proj) and MLP "
                 "(linear_fc1, linear_fc2) or MoELayer (router, SequentialMLP experts, shared "
                 "expert) with their norms, the embedding, output layer and final norm, as in "
                 "megatron-core's local or Transformer Engine spec")
    if getattr(model, "mtp_process", False):
        raise ConfigError(f"prune does not support the module mtp (multi-token prediction); "
                          f"{supported}")
    for key, _ in model.named_parameters():
        parsed = layouts.split_layer_key(key)
        if (parsed[1] in LAYER_TENSORS or moe.is_moe_tensor(parsed[1])) if parsed \
                else key in OTHER_TENSORS:
            continue
        path = key.rpartition(".")[0]
        parts = path.split(".")
        # The outermost module under the layer that is not one of the known ones.
        for i in range(4 if parsed else 1, len(parts) + 1):
            module = model.get_submodule(".".join(parts[:i]))
            if type(module).__name__ not in _KNOWN_MODULES or i == len(parts):
                break
        raise ConfigError(f"prune does not support the module {'.'.join(parts[:i])} "
                          f"({type(module).__name__}, holding {key}); {supported}")


def _check_plan(model: torch.nn.Module, plan: PrunePlan) -> None:
    """One-line errors, before anything is built, for a plan that is not this model's."""
    from megatron.core import parallel_state as ps

    tc, src = model.config, plan.source
    for name, want in (("num_layers", src.num_layers), ("hidden_size", src.hidden_size),
                       ("ffn_hidden_size", src.ffn_hidden_size),
                       ("num_attention_heads", src.num_attention_heads),
                       ("num_query_groups", src.query_groups), ("kv_channels", src.head_dim),
                       *_moe_sizes(src).items()):
        have = getattr(tc, name)
        if name == "num_query_groups" and have is None:
            have = tc.num_attention_heads
        if have != want:
            raise ConfigError(f"the plan was made for another model: plan.source.{name}={want}, "
                              f"the model's TransformerConfig.{name}={have}")
    ep = ps.get_expert_model_parallel_world_size()
    if ep > 1 and ps.get_pipeline_model_parallel_world_size() > 1:
        raise ConfigError(f"pruning under expert parallelism (expert_model_parallel_size={ep}) "
                          f"together with pipeline parallelism is not supported: prune at PP=1 "
                          f"or EP=1 (the checkpoint loads under any layout)")
    c = plan.config
    # The target's rules, against the layout the model actually has.
    validate_target(src, Target(layer_shapes=c.layer_shapes) if c.is_heterogeneous else
                    Target(num_layers=c.num_layers, hidden_size=c.hidden_size,
                           ffn_hidden_size=None if src.is_moe else c.ffn_hidden_size,
                           num_attention_heads=c.num_attention_heads,
                           num_query_groups=c.query_groups, hardware_multiple=1,
                           **_moe_sizes(c)),
                    ps.get_tensor_model_parallel_world_size(),
                    ps.get_pipeline_model_parallel_world_size(), ep)
    have, want = _count(model), count_params(src)
    if have != want:  # e.g. a user's GPTModel with learned positions, described as RoPE
        raise ConfigError(f"the model holds {have} parameters, the plan's source config "
                          f"describes {want}: it is not this model's config (GPTModel's own "
                          f"arguments, e.g. position_embedding_type="
                          f"{src.position_embedding_type!r}, vocab_size, "
                          f"share_embeddings_and_output_weights, go to "
                          f"ModelConfig.from_transformer_config)")
    if plan.fingerprint is not None:
        mine = weights_fingerprint(model)
        if not same_weights(mine, plan.fingerprint):
            raise ConfigError(f"the plan's scores were computed on different weights "
                              f"(fingerprint {plan.fingerprint} != this model's {mine}); "
                              f"estimate the importance on this model")


def _moe_sizes(cfg: Any) -> dict[str, int | None]:
    """The MoE sizes of ``cfg`` by ``TransformerConfig`` name (all None for a dense model)."""
    return {"num_moe_experts": cfg.num_moe_experts,
            "moe_ffn_hidden_size": cfg.expert_ffn_hidden_size if cfg.is_moe else None,
            "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size}


def _count(model: torch.nn.Module) -> int:
    """Parameters of the whole model over every TP/PP/EP rank (each tensor once)."""
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    total = model_sum(model.named_parameters(),
                      lambda p: torch.tensor([float(p.numel())], dtype=torch.float64), 1, tied)
    return int(total.item())


def prune_model(model: torch.nn.Module, plan: PrunePlan, *,
                build: Build | None = None) -> torch.nn.Module:
    """The pruned model under the current TP/PP layout: a new model of ``type(model)`` with
    the user's own layer spec and ``model.config`` with the pruned sizes (every other field as
    the user set it), ``GPTModel``'s own arguments read back from ``model`` (``build(config)``
    for a subclass whose constructor needs more), weights sliced one layer at a time. Kept
    layers are re-spread evenly over the pipeline stages and kept units re-split evenly over
    the tensor-parallel ranks. ``model`` is not changed.

    A collective: every rank of the model-parallel group calls it. Memory per rank: its old
    and new shards plus one full layer (``model.stream``)."""
    src = unwrap(model)
    check_supported(src)
    _check_plan(src, plan)
    c = plan.config
    config = replace_config(src.config, num_layers=c.num_layers, hidden_size=c.hidden_size,
                            ffn_hidden_size=c.ffn_hidden_size,
                            num_attention_heads=c.num_attention_heads,
                            num_query_groups=c.query_groups, kv_channels=c.head_dim,
                            layernorm_epsilon=c.layernorm_epsilon,
                            **(_moe_sizes(c) if c.is_moe else {}))
    if c.is_heterogeneous:  # megatron-core's heterogeneous config and layer spec
        config, build = hetero_build(src, c, config, build)
    pruned = rebuild(src, config, build)
    fill_others(src, pruned, lambda key, w: prune_other(key, w, plan))
    if c.is_heterogeneous:  # every layer kept in place: each stage fills its own
        fill_layers(src, pruned, lambda full, s: prune_layer(full, plan, s), c)
    else:
        def rename(name: str, layer: int) -> str | None:  # kept experts renumbered
            kept = plan.kept_experts.get(layer)
            return name if kept is None else moe.expert_name(name, kept.tolist())

        stream_layers(src, pruned, plan.kept_layers,
                      lambda full, s: prune_layer(full, plan, s), plan.config, rename)
    have, predicted = _count(pruned), count_params(plan.config)
    if have != predicted:
        raise AssertionError(f"the pruned model holds {have} parameters, its config predicts "
                             f"{predicted}")
    return pruned

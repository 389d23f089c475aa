"""Analytic parameter counts of a ``ModelConfig`` (must equal the built model's count)."""

from __future__ import annotations

from typing import Any

from nemo_minitron.config import ModelConfig


def mlp_params(cfg: ModelConfig, f: int) -> int:
    """Parameters of one MLP of intermediate size ``f`` (a dense MLP or one expert)."""
    h, bias = cfg.hidden_size, cfg.add_bias_linear
    fc1_out = f * (2 if cfg.activation == "swiglu" else 1)
    return fc1_out * h + (fc1_out if bias else 0) + h * f + (h if bias else 0)


def moe_params(cfg: ModelConfig, active: bool) -> int:
    """Parameters of one MoE MLP: router, experts (only the ``moe_router_topk`` a token runs
    when ``active``) and the shared expert with its gate."""
    h, e = cfg.hidden_size, cfg.num_moe_experts or 0
    experts = (cfg.moe_router_topk if active else e) * mlp_params(cfg, cfg.expert_ffn_hidden_size)
    shared = cfg.moe_shared_expert_intermediate_size
    shared_params = mlp_params(cfg, shared) + (h if cfg.moe_shared_expert_gate else 0) \
        if shared else 0
    return e * h + experts + shared_params


def layer_params(cfg: ModelConfig, active: bool = False, layer: int | None = None) -> int:
    """Parameters of one transformer layer (``layer``: which one, for a heterogeneous model;
    None: a uniform model's); ``active``: those one token runs (an MoE layer's
    ``moe_router_topk`` experts, not all of them)."""
    if cfg.is_heterogeneous:
        if layer is None:
            raise ValueError("layer_params of a heterogeneous model needs the layer")
        return _hetero_layer_params(cfg, layer)
    h, d = cfg.hidden_size, cfg.head_dim
    a, g = cfg.num_attention_heads, cfg.query_groups
    norm = h * (2 if cfg.normalization == "LayerNorm" else 1)
    bias = cfg.add_bias_linear
    qkv = (a + 2 * g) * d * h + ((a + 2 * g) * d if (bias or cfg.add_qkv_bias) else 0)
    proj = h * a * d + (h if bias else 0)
    mlp = moe_params(cfg, active) if cfg.is_moe else mlp_params(cfg, cfg.ffn_hidden_size)
    qk_norms = 2 * norm // h * d if cfg.qk_layernorm else 0
    return 2 * norm + qk_norms + qkv + proj + mlp


def count_params(cfg: ModelConfig, active: bool = False) -> int:
    """Parameters of the whole (unsharded) model, or with ``active`` those one token runs
    (``layer_params``); ``vocab_size`` must be set."""
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size must be set to count parameters")
    h = cfg.hidden_size
    emb = cfg.vocab_size * h
    pos = cfg.context_length * h if cfg.position_embedding_type == "learned_absolute" else 0
    final_norm = h * (2 if cfg.normalization == "LayerNorm" else 1)
    out = 0 if cfg.share_embeddings_and_output_weights else cfg.vocab_size * h
    return emb + pos + sum(per_layer_params(cfg, active)) + final_norm + out


def per_layer_params(cfg: ModelConfig, active: bool = False) -> list[int]:
    """``layer_params`` of every layer, in order (the same number for a uniform model)."""
    if not cfg.is_heterogeneous:
        return [layer_params(cfg, active)] * cfg.num_layers
    return [layer_params(cfg, active, i) for i in range(cfg.num_layers)]


def _hetero_layer_params(cfg: ModelConfig, layer: int) -> int:
    """Parameters of layer ``layer`` of a heterogeneous model: per block, the full sublayer of
    the layer's sizes with its norm, a linear replacement (norm + hidden x hidden linear) or
    nothing (megatron-core's heterogeneous layer spec)."""
    shape, one = cfg.layer_shape(layer), cfg.layer_config(layer)
    h = cfg.hidden_size
    norm = h * (2 if cfg.normalization == "LayerNorm" else 1)
    linear = norm + h * h + (h if cfg.add_bias_linear else 0)
    full = layer_params(one)
    mlp_full = norm + mlp_params(one, one.ffn_hidden_size)
    attn_full = full - mlp_full
    attn = {"full": attn_full, "linear": linear, "no_op": 0}[shape.attention]
    mlp = {"full": mlp_full, "linear": linear, "no_op": 0}[shape.mlp]
    return attn + mlp


def weight_shape(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that fix the shapes of the weights, defaults resolved (``vocab_size`` None
    until a tokenizer sets it): the weights of two models fit each other when these agree."""
    learned = cfg.position_embedding_type == "learned_absolute"
    return {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "ffn_hidden_size": cfg.ffn_hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_query_groups": cfg.query_groups, "kv_channels": cfg.head_dim,
            "vocab_size": cfg.vocab_size, "activation": cfg.activation,
            "normalization": cfg.normalization, "add_bias_linear": cfg.add_bias_linear,
            "add_qkv_bias": cfg.add_qkv_bias,
            "share_embeddings_and_output_weights": cfg.share_embeddings_and_output_weights,
            "position_embeddings": cfg.context_length if learned else None,
            # Only when set: the shape of a model without them reads as before.
            **({"qk_layernorm": True} if cfg.qk_layernorm else {}),
            **({"layer_shapes": [cfg.layer_shape(i) for i in range(cfg.num_layers)]}
               if cfg.is_heterogeneous else {}),
            **({"num_moe_experts": cfg.num_moe_experts,
                "moe_ffn_hidden_size": cfg.expert_ffn_hidden_size,
                "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size,
                "moe_shared_expert_gate": cfg.moe_shared_expert_gate} if cfg.is_moe else {})}


def model_sum(tensors: Any, value: Any, size: int, tied: bool = False) -> Any:
    """``sum of value(tensor)`` (a float64 vector of ``size``) over ``tensors`` (``(key,
    tensor)`` of this rank's stage) summed over the whole model: a TP-replicated tensor once, a
    tied output layer not at all (it is the embedding), every pipeline stage, and an
    expert-parallel tensor (megatron-core marks it ``allreduce=False``) of every EP rank.
    Collective over the model-parallel and expert-parallel groups."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    acc = torch.zeros(2, size, dtype=torch.float64)  # [dense, expert-parallel]
    for key, p in tensors:
        if key.endswith("_extra_state") or (tied and key == "output_layer.weight"):
            continue
        if tp_rank and not getattr(p, "tensor_model_parallel", False):
            continue
        acc[0 if getattr(p, "allreduce", True) else 1] += value(p)
    if dist.is_initialized() and dist.get_world_size(ps.get_model_parallel_group()) > 1:
        dist.all_reduce(acc, group=ps.get_model_parallel_group())
    if dist.is_initialized() and ps.get_expert_model_parallel_world_size() > 1:
        dist.all_reduce(acc[1], group=ps.get_expert_model_parallel_group())
    return acc.sum(0)


def weights_fingerprint(model) -> list[float]:
    """``[sum |w|, sum w^2]`` over the whole model, the same under every TP/PP/EP/DP layout
    (``model_sum``). Tells whether saved importance scores or a teacher cache were computed on
    these weights (``same_weights``)."""
    import torch

    def norms(p: Any) -> Any:
        # Reduced in float64 on the weights' device (no float64 copy sent to the host).
        w = p.detach().reshape(-1)
        w = w if w.is_floating_point() else w.double()  # vector_norm takes floats only
        return torch.stack([torch.linalg.vector_norm(w, 1, dtype=torch.float64),
                            torch.linalg.vector_norm(w, 2, dtype=torch.float64).square()]).cpu()

    tied = getattr(model, "share_embeddings_and_output_weights", False)
    return model_sum(model.state_dict(keep_vars=True).items(), norms, 2, tied).tolist()


def same_weights(have: list[float], want: list[float]) -> bool:
    """Whether two ``weights_fingerprint``s are of the same weights (up to the reduction order
    of another layout)."""
    return len(have) == len(want) and all(abs(a - b) <= 1e-6 * max(abs(b), 1.0)
                                          for a, b in zip(have, want))

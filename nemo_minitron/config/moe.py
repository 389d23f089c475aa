"""The MoE fields between ``ModelConfig`` and megatron-core's ``TransformerConfig``."""

from __future__ import annotations

from typing import Any

from nemo_minitron.config.errors import ConfigError

MOE_FIELDS = ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
              "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
              "moe_router_pre_softmax", "moe_aux_loss_coeff", "moe_z_loss_coeff",
              "moe_token_dispatcher_type")
"""``ModelConfig`` fields that are ``TransformerConfig`` fields of the same name (MoE)."""
MOE_DEFAULTS = {"moe_layer_freq": 1, "moe_router_score_function": "softmax",
                "moe_router_topk_scaling_factor": None, "moe_router_num_groups": None,
                "moe_router_enable_expert_bias": False, "moe_router_load_balancing_type":
                "aux_loss", "moe_expert_capacity_factor": None}
"""MoE features a ``ModelConfig`` cannot describe: refused unless at these values."""


def moe_fields(cfg: Any) -> dict[str, Any]:
    """The MoE fields of ``TransformerConfig`` for ``ModelConfig`` ``cfg`` (none for a dense
    model): Megatron's per-expert MLPs (no grouped GEMM: it needs Transformer Engine or a GPU
    kernel) and ``MOE_FIELDS``."""
    if not cfg.is_moe:
        return {}
    from megatron.core import parallel_state as ps

    return dict(moe_grouped_gemm=False, moe_ffn_hidden_size=cfg.expert_ffn_hidden_size,
                expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
                **{name: getattr(cfg, name) for name in MOE_FIELDS
                   if name != "moe_ffn_hidden_size"})


def moe_from_transformer_config(config: Any) -> dict[str, Any]:
    """The ``ModelConfig`` MoE fields of a ``TransformerConfig`` (none for a dense one); a
    one-line error for an MoE feature ``ModelConfig`` cannot describe."""
    if not config.num_moe_experts:
        return {}
    for name, default in MOE_DEFAULTS.items():
        if getattr(config, name, default) != default:
            raise ConfigError(f"TransformerConfig.{name}={getattr(config, name)!r} is not "
                              f"supported (MoE models with {name}={default!r} only)")
    return {name: getattr(config, name) for name in MOE_FIELDS}

"""Build a Llama-style Megatron-core ``GPTModel`` from a ``ModelConfig``.

The Transformer Engine layer spec is used when TE imports and a GPU is present (needed for
FP8), Megatron's local spec otherwise. The local spec's core attention is Megatron's
``DotProductAttention`` (``attention="local"``) or torch's fused SDPA kernel
(``attention="sdpa"``, ``nemo_minitron/model/attention.py``); both have no parameters, so
checkpoints are the same. Its self-attention caches keys with RoPE applied
(``RopeCachedSelfAttention``: decoding does not re-apply RoPE to the whole cache each token)
and rotates without concatenations (``model/rope.py``), its MLP skips a no-op addition of
Megatron's SwiGLU (``model/mlp.py``), and its linear layers are a direct product when no
gradient is recorded on one tensor-parallel rank (``model/linear.py``). The model is
``model/gpt.py``'s ``GPTModel``, which computes returned logits batch-first (no copy), can hand
a loss its sequence-first logits and decodes without the CPU backend's device mode.
The model is built for the calling rank's pipeline stage of the current parallel state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.utils.logging import get_logger

log = get_logger("model")

ATTENTIONS = ("local", "sdpa")
"""Core attention choices of the local spec (the TE spec has its own fused attention)."""
DEFAULT_ATTENTION = "sdpa"
"""Core attention of the local spec when ``build_model`` is not told one: SDPA, measured as
fast as transformers' forward+backward on CPU where Megatron's ``DotProductAttention`` is ~25%
slower (``benchmarks/cpu_speed.py``), and equal to it to 1e-5 (``tests/model/test_attention``)."""


def te_available() -> bool:
    """Transformer Engine is importable and a GPU is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP's activation function for ``ModelConfig.activation``."""
    from megatron.core.activations import squared_relu

    return {"swiglu": F.silu, "gelu": F.gelu, "squared_relu": squared_relu}[name]


def params_dtype(bf16: bool) -> torch.dtype:
    """The parameters' dtype (the model's and its optimizer's): bf16 or fp32."""
    return torch.bfloat16 if bf16 else torch.float32


def transformer_config(cfg: ModelConfig, *, bf16: bool = False, fp8: str | None = None):
    """Megatron ``TransformerConfig`` for ``cfg`` under the current parallel state."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    dtype = params_dtype(bf16)
    swiglu = cfg.activation == "swiglu"
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        kv_channels=cfg.head_dim,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.layernorm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=_activation(cfg.activation),
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        init_method_std=cfg.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        # CPU initialisation draws the full master weight then slices it: identical weights
        # for every TP layout, which is what the layout-equivalence tests rely on.
        use_cpu_initialization=not torch.cuda.is_available(),
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        fp8=fp8,
    )


MODEL_FIELDS = ("vocab_size", "make_vocab_size_divisible_by", "seq_length",
                "max_position_embeddings", "position_embedding_type", "rotary_base",
                "rope_scaling_factor", "share_embeddings_and_output_weights")
"""``ModelConfig`` fields that are ``GPTModel`` arguments, not ``TransformerConfig`` fields."""
UNSUPPORTED = ("num_moe_experts", "multi_latent_attention", "qk_layernorm", "qk_l2_norm",
               "attention_output_gate", "window_size", "rotary_interleaved",
               "apply_residual_connection_post_layernorm", "layernorm_zero_centered_gamma",
               "softmax_scale", "mtp_num_layers", "heterogeneous_block_specs",
               "activation_func_clamp_value", "glu_linear_offset", "experimental_attention_variant",
               "is_hybrid_model", "no_rope_freq")
"""``TransformerConfig`` features a ``ModelConfig`` cannot describe (refused when set)."""


def model_config(config: Any, **fields: Any) -> ModelConfig:
    """The ``ModelConfig`` of a megatron-core ``TransformerConfig``, the inverse of
    ``transformer_config``; ``fields``: the ``GPTModel`` arguments among ``MODEL_FIELDS``
    (``vocab_size``, ``seq_length``, ...). One-line error for what it cannot describe."""
    unknown = sorted(set(fields) - set(MODEL_FIELDS))
    if unknown:
        known = unknown[0] in {f.name for f in dataclasses.fields(ModelConfig)}
        raise ConfigError(f"{unknown[0]}: {'taken from' if known else 'not a field of'} the "
                          f"TransformerConfig; the keyword arguments are the GPTModel's: "
                          f"{', '.join(MODEL_FIELDS)}")
    for name in UNSUPPORTED:
        if getattr(config, name, None):
            raise ConfigError(f"TransformerConfig.{name}={getattr(config, name)!r} is not "
                              "supported (Llama-style dense GPT models only)")
    if config.normalization not in ("RMSNorm", "LayerNorm"):
        raise ConfigError(f"TransformerConfig.normalization={config.normalization!r} must be "
                          "RMSNorm or LayerNorm")
    activation = next((name for name in ("swiglu", "gelu", "squared_relu")
                       if _activation(name) is config.activation_func
                       and config.gated_linear_unit == (name == "swiglu")), None)
    if activation is None:
        fn = getattr(config.activation_func, "__name__", config.activation_func)
        raise ConfigError(f"TransformerConfig.activation_func={fn} with gated_linear_unit="
                          f"{config.gated_linear_unit} is not one of: F.silu gated (SwiGLU), "
                          "F.gelu, squared_relu (not gated)")
    return ModelConfig(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups, kv_channels=config.kv_channels,
        normalization=config.normalization, layernorm_epsilon=config.layernorm_epsilon,
        activation=activation, add_bias_linear=config.add_bias_linear,
        add_qkv_bias=config.add_qkv_bias, init_method_std=config.init_method_std, **fields)


def check_attention(attention: str) -> None:
    """One-line error unless ``attention`` is one of ``ATTENTIONS``."""
    if attention not in ATTENTIONS:
        raise ConfigError(f"attention={attention!r}: must be one of {', '.join(ATTENTIONS)}")


def layer_spec(cfg: ModelConfig, use_te: bool | None = None, attention: str | None = None):
    """The TE spec when TE and a GPU are present, else the local spec with ``attention``
    (default ``DEFAULT_ATTENTION``) as its core attention."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    attention = attention or DEFAULT_ATTENTION
    check_attention(attention)
    use_te = te_available() if use_te is None else use_te
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.transformer.identity_op import IdentityOp

    from nemo_minitron.model.attention import RopeCachedSelfAttention, SDPAttention
    from nemo_minitron.model.linear import InferenceColumnParallelLinear as Column
    from nemo_minitron.model.linear import InferenceRowParallelLinear as Row
    from nemo_minitron.model.mlp import SwiGLUMLP

    spec = specs.get_gpt_layer_local_spec(normalization=cfg.normalization)
    attn, mlp = spec.submodules.self_attention, spec.submodules.mlp
    attn.module, mlp.module = RopeCachedSelfAttention, SwiGLUMLP
    attn.submodules.linear_qkv, attn.submodules.linear_proj = Column, Row
    for norm in ("q_layernorm", "k_layernorm"):
        if getattr(attn.submodules, norm) is IdentityOp:
            # Megatron's own spelling of "none": no module to call per layer and step.
            setattr(attn.submodules, norm, None)
    mlp.submodules.linear_fc1, mlp.submodules.linear_fc2 = Column, Row
    if attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_model(cfg: ModelConfig, *, bf16: bool = False, fp8: str | None = None,
                use_te: bool | None = None, attention: str | None = None):
    """Build this rank's ``GPTModel`` stage (on the rank's device, fp32 or bf16 params).
    ``use_te=False`` forces Megatron's local spec (its checkpoint keys map onto TE's).
    ``attention`` picks the local spec's core attention (``ATTENTIONS``, default
    ``DEFAULT_ATTENTION``); the TE spec ignores it."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.model.gpt import MinitronGPTModel

    attention = attention or DEFAULT_ATTENTION
    check_attention(attention)
    if cfg.vocab_size is None:
        raise ConfigError("model.vocab_size is not set (it comes from the tokenizer)")
    cfg.check_layout(ps.get_tensor_model_parallel_world_size(),
                     ps.get_pipeline_model_parallel_world_size())
    if fp8 is not None and not te_available():
        raise ConfigError("train.fp8 needs Transformer Engine and a GPU")
    from nemo_minitron.model.mlp import quiet_unknown_mlp

    config = transformer_config(cfg, bf16=bf16, fp8=fp8)
    with quiet_unknown_mlp():
        model = MinitronGPTModel(
            config=config,
            transformer_layer_spec=layer_spec(cfg, use_te, attention=attention),
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.context_length,
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
            position_embedding_type=cfg.position_embedding_type,
            rotary_base=cfg.rotary_base,
            rope_scaling=cfg.rope_scaling_factor is not None,
            rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
            parallel_output=True,
        )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if bf16:
        model.bfloat16()
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers down to the ``GPTModel``."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model

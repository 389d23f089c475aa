"""Hugging Face ``config.json`` of the Llama family <-> ``ModelConfig``.

Supported on import: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` (all are
pre-norm RMSNorm + RoPE + SwiGLU + GQA; Qwen2 adds a bias on q/k/v only), and the mixtures of
experts ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM``, ``Qwen3MoeForCausalLM``
(``interop/hf_moe.py``). Export writes
``LlamaForCausalLM``; ``Qwen2ForCausalLM`` when the model has a QKV bias; and
``MistralForCausalLM`` (sliding window off, otherwise the same network) when pruning left
``hidden_size`` not divisible by the heads, which transformers' Llama config rejects; an MoE
model as Mixtral, Qwen2-MoE (a shared expert) or Qwen3-MoE (query/key norms)
(``hf_moe.hf_moe_arch``).
"""

from __future__ import annotations

import math
from typing import Any

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.config.hetero import as_uniform
from nemo_minitron.interop.hf_hetero import (
    DECILM_ARCH,
    DECILM_MODEL_TYPE,
    block_configs_hf,
    decilm_model_fields,
)
from nemo_minitron.interop.hf_moe import MOE_ARCHS, hf_moe_arch, hf_moe_config, moe_fields_from_hf
from nemo_minitron.utils.logging import get_logger

log = get_logger("interop")

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", *MOE_ARCHS,
             DECILM_ARCH)
# Default training/calibration window of an imported model (``model.seq_length``); the model's
# own context (``max_position_embeddings``) is kept separately and exported unchanged.
IMPORT_SEQ_LENGTH = 2048


# Megatron's Llama 3.1 scaling has these constants built in; other values cannot be mapped.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def _rope(hf: dict[str, Any]) -> tuple[float, float | None]:
    """(RoPE base, Llama 3.1 scaling factor or None) from transformers 5 ``rope_parameters``
    or the older ``rope_theta`` / ``rope_scaling``."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3" and all(float(params.get(k, -1)) == v
                                     for k, v in LLAMA3_ROPE.items()):
        return theta, float(params["factor"])
    raise ConfigError(f"config.json rope type {rope_type!r} is not supported (default RoPE, or "
                      f"llama3 with {LLAMA3_ROPE})")


def model_config_from_hf(hf: dict[str, Any], seq_length: int | None = None) -> ModelConfig:
    """The ``ModelConfig`` of an HF Llama-family ``config.json`` (vocabulary kept exact)."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else hf.get("model_type", "?")
    if len(archs) != 1 or arch not in SUPPORTED:
        raise ConfigError(f"config.json architecture {arch!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED)}")
    hetero: dict[str, Any] = {}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "intermediate_size"):
        if key == "intermediate_size" and arch == DECILM_ARCH:
            # Per block in the block-config format (interop/hf_hetero.py).
            hetero = decilm_model_fields(hf)
            hf = {**hf, "intermediate_size": hetero["intermediate_size"],
                  "num_key_value_heads": hetero["num_key_value_heads"]}
        v = hf.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"config.json field {key!r} is missing or not a positive integer "
                              f"(got {v!r})")
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        v = hf.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"config.json field {key!r}={v!r} must be a positive integer")
    for key in ("rms_norm_eps", "initializer_range", "rope_theta"):
        v = hf.get(key)
        if v is not None and (not isinstance(v, int | float) or isinstance(v, bool)
                              or not math.isfinite(v) or v <= 0):
            raise ConfigError(f"config.json field {key!r}={v!r} must be a positive number")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json hidden_act={hf['hidden_act']!r} is not supported "
                          f"(only silu)")
    qwen2 = arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
    moe = moe_fields_from_hf(arch, hf) if arch in MOE_ARCHS else {}
    if hf.get("mlp_bias") or (arch != "Qwen2ForCausalLM" and hf.get("attention_bias")):
        raise ConfigError("config.json mlp_bias/attention_bias (bias on every projection) is "
                          "not supported")
    if qwen2 and hf.get("use_sliding_window"):
        raise ConfigError("config.json use_sliding_window=true is not supported")
    if arch in ("MistralForCausalLM", "MixtralForCausalLM") \
            and hf.get("sliding_window") is not None:
        log.warning("sliding_window=%s is ignored: attention is full (exact for sequences up to "
                    "the window)", hf["sliding_window"])
    heads = hf["num_attention_heads"]
    theta, rope_factor = _rope(hf)
    if theta != int(theta):
        raise ConfigError(f"config.json rope_theta={theta} must be an integer here")
    max_pos = int(hf.get("max_position_embeddings") or 4096)
    train_seq = seq_length or min(max_pos, IMPORT_SEQ_LENGTH)
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        make_vocab_size_divisible_by=1,
        seq_length=train_seq,
        max_position_embeddings=max_pos,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        activation="swiglu",
        position_embedding_type="rope",
        rotary_base=int(theta),
        rope_scaling_factor=rope_factor,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        add_bias_linear=False,
        add_qkv_bias=arch == "Qwen2ForCausalLM" or (arch == "Qwen2MoeForCausalLM"
                                                    and hf.get("qkv_bias", True)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        layer_shapes=hetero.get("layer_shapes"),
        **moe,
    )


def hf_config_from_model(cfg: ModelConfig, *, bos: int | None, eos: int | None,
                         pad: int | None = None, unk: int | None = None,
                         dtype: str = "float32") -> dict[str, Any]:
    """An HF ``config.json`` for ``cfg``; ConfigError for what HF Llama/Qwen2 cannot hold. A
    heterogeneous model is written in the block-config format (``interop/hf_hetero.py``)
    unless all its layers have the same full shape: then it is a plain Llama."""
    cfg = as_uniform(cfg) or cfg
    for name, value, want in (("normalization", cfg.normalization, "RMSNorm"),
                              ("activation", cfg.activation, "swiglu"),
                              ("position_embedding_type", cfg.position_embedding_type, "rope"),
                              ("add_bias_linear", cfg.add_bias_linear, False)):
        if value != want:
            raise ConfigError(f"model.{name}={value!r} cannot be exported to Hugging Face "
                              f"Llama/Qwen2 (needs {want!r})")
    if cfg.qk_layernorm and not cfg.is_moe:
        raise ConfigError("model.qk_layernorm=true cannot be exported to Hugging Face "
                          "Llama/Qwen2 (only Qwen3-MoE here)")
    if cfg.vocab_size is None:
        raise ConfigError("model.vocab_size is not set in the checkpoint")
    if cfg.is_heterogeneous and cfg.add_qkv_bias:
        raise ConfigError("model.add_qkv_bias=true cannot be exported in the block-config "
                          "format (DeciLM has no attention bias)")
    if cfg.is_moe:
        arch, model_type = hf_moe_arch(cfg)
    elif cfg.is_heterogeneous:
        arch, model_type = DECILM_ARCH, DECILM_MODEL_TYPE
    elif cfg.add_qkv_bias:
        arch, model_type = "Qwen2ForCausalLM", "qwen2"
    elif cfg.hidden_size % cfg.num_attention_heads:
        arch, model_type = "MistralForCausalLM", "mistral"
    else:
        arch, model_type = "LlamaForCausalLM", "llama"
    theta = float(cfg.rotary_base)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if cfg.rope_scaling_factor is not None:
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, **LLAMA3_ROPE)
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups,
        # Always explicit: after head pruning it no longer equals hidden / heads.
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.layernorm_epsilon,
        "rope_theta": theta,
        "rope_parameters": rope,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.share_embeddings_and_output_weights,
        "initializer_range": cfg.init_method_std,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "unk_token_id": unk,
        "dtype": dtype,
        "use_cache": True,
    }
    if cfg.rope_scaling_factor is not None:
        out["rope_scaling"] = rope  # what transformers 4.x and vLLM read
    if cfg.is_heterogeneous:  # sizes are per block
        del out["intermediate_size"], out["num_key_value_heads"]
        out.update(attention_bias=False, mlp_bias=False, block_configs=block_configs_hf(cfg))
    elif model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif cfg.is_moe:
        out.update(hf_moe_config(cfg))
    else:
        out.update(sliding_window=None, use_sliding_window=False)
    return out


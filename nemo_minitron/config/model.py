"""The model's shape (``ModelConfig``), its parallel layout (``ParallelConfig``), the rule of
which dimensions TP and PP must divide, and the mapping to and from Megatron's
``TransformerConfig``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from nemo_minitron.config.errors import ConfigError, positive
from nemo_minitron.config.hetero import (
    LayerShape,
    check_layer_shapes,
    hetero_fields,
    resolved,
    shapes_from_blocks,
)
from nemo_minitron.config.moe import moe_fields, moe_from_transformer_config

TP_SHARDED = ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size",
              "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
"""Dimensions split across tensor-parallel ranks (the layers are split across PP stages)."""


def layout_divisor(name: str, tp: int, pp: int) -> int:
    """What model dimension ``name`` must be a multiple of under TP=``tp``, PP=``pp``: TP for
    the sharded dimensions, PP for ``num_layers``, else 1."""
    return tp if name in TP_SHARDED else pp if name == "num_layers" else 1


def check_divisible(values: Mapping[str, int | None], tp: int, pp: int, prefix: str) -> None:
    """One-line error for the first of ``values`` (model dimension -> size, None: not set)
    that its layout divisor (``layout_divisor``) does not divide; ``prefix``: the section."""
    for name, value in values.items():
        d = layout_divisor(name, tp, pp)
        if value is not None and value % d:
            axis = "pipeline" if name == "num_layers" else "tensor"
            raise ConfigError(f"{prefix}{name}={value} is not divisible by "
                              f"parallel.{axis}_model_parallel_size={d}")


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of a Llama-style Megatron-core GPT model."""

    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 256
    """Width of the residual stream (embedding channels)."""
    ffn_hidden_size: int = 768
    """MLP intermediate size (per gate for SwiGLU)."""
    num_attention_heads: int = 8
    """Number of query heads."""
    num_query_groups: int | None = None
    """Number of key/value groups (GQA); None means one per head (MHA)."""
    kv_channels: int | None = None
    """Per-head dimension; None means hidden_size // num_attention_heads."""
    vocab_size: int | None = None
    """Padded vocabulary size of the embedding; None takes the tokenizer's, padded."""
    make_vocab_size_divisible_by: int = 128
    """The tokenizer's vocabulary is padded up to a multiple of this."""
    seq_length: int = 256
    """Training sequence length: the default window of training, calibration and evaluation."""
    max_position_embeddings: int | None = None
    """The model's context length (positions it supports; model metadata, exported as
    Hugging Face ``max_position_embeddings``); None: ``seq_length``."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Normalization layer type."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of the normalization layers."""
    activation: Literal["swiglu", "gelu", "squared_relu"] = "swiglu"
    """MLP activation: gated SiLU (SwiGLU, two fc1 halves), plain GeLU, or squared ReLU
    (Nemotron-4, Megatron's ``activations.squared_relu``)."""
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    """Rotary or learned absolute position embeddings."""
    rotary_base: int = 10000
    """RoPE base frequency."""
    rope_scaling_factor: float | None = None
    """Llama 3.1 RoPE frequency scaling (Megatron's ``rope_scaling``: low/high frequency
    factors 1 and 4, original context 8192) with this factor; None: plain RoPE."""
    share_embeddings_and_output_weights: bool = False
    """Tie the output layer to the word embeddings."""
    add_bias_linear: bool = False
    """Biases on every linear layer."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection only (Qwen2 style)."""
    qk_layernorm: bool = False
    """Normalize each query and key head over ``kv_channels`` before RoPE (Qwen3 style; the
    ``normalization`` type, ``layernorm_epsilon``)."""
    init_method_std: float = 0.02
    """Standard deviation of the weight initialisation."""
    num_moe_experts: int | None = None
    """Routed experts of every layer's mixture-of-experts MLP; None: a dense MLP."""
    moe_router_topk: int = 2
    """Experts each token is routed to (MoE only)."""
    moe_ffn_hidden_size: int | None = None
    """Intermediate size of each routed expert (per gate for SwiGLU); None: ffn_hidden_size."""
    moe_shared_expert_intermediate_size: int | None = None
    """Intermediate size of the shared expert every token passes through; None: none."""
    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output by a learned sigmoid gate (Qwen2-MoE)."""
    moe_router_pre_softmax: bool = False
    """Softmax over all experts before the top-k (weights do not sum to 1, Qwen2-MoE); False:
    softmax over the top-k logits (Mixtral)."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the router's load-balancing (switch) loss in the training loss."""
    moe_z_loss_coeff: float | None = None
    """Weight of the router's z-loss (mean squared logsumexp of its logits); None: off."""
    moe_token_dispatcher_type: Literal["allgather", "alltoall"] = "allgather"
    """How tokens reach their experts' ranks (Megatron's dispatchers; ``flex`` needs GPUs)."""
    layer_shapes: list[LayerShape] | None = None
    """Per-layer shapes of a heterogeneous model (one per layer; megatron-core's
    ``HeterogeneousTransformerConfig``); None: every layer has the shape above."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "seq_length", "make_vocab_size_divisible_by"):
            positive(f"model.{name}", getattr(self, name))
        if self.num_query_groups is not None:
            positive("model.num_query_groups", self.num_query_groups)
            if self.num_attention_heads % self.num_query_groups:
                raise ConfigError(
                    f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                    f"model.num_query_groups={self.num_query_groups}"
                )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels"
            )
        if self.vocab_size is not None:
            positive("model.vocab_size", self.vocab_size)
        self._check_moe()
        if self.layer_shapes is not None:
            check_layer_shapes(self.layer_shapes, self.num_layers, self.num_attention_heads)
            if self.is_moe:
                raise ConfigError("model.layer_shapes with model.num_moe_experts: heterogeneous "
                                  "MoE models are not supported")
        if self.max_position_embeddings is not None:
            positive("model.max_position_embeddings", self.max_position_embeddings)
            if (self.position_embedding_type == "learned_absolute"
                    and self.seq_length > self.max_position_embeddings):
                raise ConfigError(f"model.seq_length={self.seq_length} exceeds the learned "
                                  f"position table, model.max_position_embeddings="
                                  f"{self.max_position_embeddings}")

    def _check_moe(self) -> None:
        if self.num_moe_experts is None:
            return
        positive("model.num_moe_experts", self.num_moe_experts)
        positive("model.moe_router_topk", self.moe_router_topk)
        if self.moe_router_topk > self.num_moe_experts:
            raise ConfigError(f"model.moe_router_topk={self.moe_router_topk} exceeds "
                              f"model.num_moe_experts={self.num_moe_experts}")
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            if getattr(self, name) is not None:
                positive(f"model.{name}", getattr(self, name))
        if self.moe_aux_loss_coeff < 0 or (self.moe_z_loss_coeff or 0) < 0:
            raise ConfigError("model.moe_aux_loss_coeff and model.moe_z_loss_coeff must be >= 0")

    @property
    def is_moe(self) -> bool:
        """Whether the MLPs are mixtures of experts."""
        return self.num_moe_experts is not None

    @property
    def is_heterogeneous(self) -> bool:
        """Whether layers have their own shapes (``layer_shapes``)."""
        return self.layer_shapes is not None

    def layer_shape(self, layer: int) -> LayerShape:
        """The shape of 0-based layer ``layer``, sizes resolved (``hetero.resolved``)."""
        return resolved(self.layer_shapes[layer] if self.layer_shapes else LayerShape(),
                        self.query_groups, self.ffn_hidden_size)

    def layer_config(self, layer: int) -> ModelConfig:
        """The uniform config of 0-based layer ``layer`` (its own ``num_query_groups`` and
        ``ffn_hidden_size``, no ``layer_shapes``): what per-layer code (layouts, slicing,
        counting) reads. Whether a block is full is ``layer_shape(layer)``'s."""
        s = self.layer_shape(layer)
        return dataclasses.replace(
            self, layer_shapes=None, num_query_groups=s.num_query_groups or self.num_query_groups,
            ffn_hidden_size=s.ffn_hidden_size or self.ffn_hidden_size)

    @property
    def expert_ffn_hidden_size(self) -> int:
        """Effective intermediate size of a routed expert (``moe_ffn_hidden_size``)."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def check_layout(self, tp: int, pp: int, ep: int = 1) -> None:
        """One-line error unless every sharded dim divides by TP, the layers by PP and the
        experts by EP (``ep``: expert-parallel size)."""
        moe = {"moe_ffn_hidden_size": self.expert_ffn_hidden_size,
               "moe_shared_expert_intermediate_size": self.moe_shared_expert_intermediate_size
               } if self.is_moe else {}
        hetero = self.is_heterogeneous  # its layers' own sizes are checked below, by layer
        check_divisible({"num_attention_heads": self.num_attention_heads,
                         "num_query_groups": None if hetero else self.query_groups,
                         "ffn_hidden_size": None if hetero else self.ffn_hidden_size, **moe,
                         "vocab_size": self.vocab_size, "num_layers": self.num_layers},
                        tp, pp, "model.")
        for i in range(self.num_layers if self.is_heterogeneous else 0):
            s = self.layer_shape(i)
            check_divisible({"num_query_groups": s.num_query_groups,
                             "ffn_hidden_size": s.ffn_hidden_size}, tp, 1,
                            f"model.layer_shapes[{i}].")
        if ep > 1 and not self.is_moe:
            raise ConfigError(f"parallel.expert_model_parallel_size={ep} needs an MoE model "
                              "(model.num_moe_experts)")
        if self.is_moe and self.num_moe_experts % ep:
            raise ConfigError(f"model.num_moe_experts={self.num_moe_experts} is not divisible "
                              f"by parallel.expert_model_parallel_size={ep}")

    @property
    def query_groups(self) -> int:
        """Effective number of query groups."""
        return self.num_query_groups or self.num_attention_heads

    def with_seq_length(self, seq_length: int | None) -> ModelConfig:
        """The same model run on ``seq_length``-token windows (None: unchanged); its context
        length (and so its position table) stays what it was."""
        if seq_length is None or seq_length == self.seq_length:
            return self
        return dataclasses.replace(self, seq_length=seq_length,
                                   max_position_embeddings=self.context_length)

    @property
    def context_length(self) -> int:
        """Effective maximum positions (``max_position_embeddings`` or ``seq_length``)."""
        return self.max_position_embeddings or self.seq_length

    @property
    def head_dim(self) -> int:
        """Effective per-head dimension (``kv_channels``)."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformer_config(cls, config: Any, **fields: Any) -> ModelConfig:
        """The config of a megatron-core ``TransformerConfig`` a user built; ``fields``: the
        ``GPTModel`` arguments (``vocab_size``, ``seq_length``, ``rotary_base``, ...; see
        ``model_config``)."""
        return model_config(config, **fields)

    def to_transformer_config(self, *, bf16: bool = False, fp8: str | None = None) -> Any:
        """Megatron's ``TransformerConfig`` for this model under the current parallel state,
        as ``build_model`` makes it (``transformer_config``: no dropout, unfused kernels)."""
        return transformer_config(self, bf16=bf16, fp8=fp8)

    def padded_vocab_size(self, tokenizer_vocab_size: int) -> int:
        """Round a tokenizer vocabulary up to ``make_vocab_size_divisible_by``."""
        d = self.make_vocab_size_divisible_by
        return -(-tokenizer_vocab_size // d) * d


@dataclass(kw_only=True)
class ParallelConfig:
    """Model-parallel layout; the data-parallel size is world_size / (TP * PP)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (TP)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (PP)."""
    expert_model_parallel_size: int = 1
    """Expert-parallel size (EP): an MoE layer's experts split over this many data-parallel
    ranks (it must divide the data-parallel size)."""

    def __post_init__(self) -> None:
        positive("parallel.tensor_model_parallel_size", self.tensor_model_parallel_size)
        positive("parallel.pipeline_model_parallel_size", self.pipeline_model_parallel_size)
        positive("parallel.expert_model_parallel_size", self.expert_model_parallel_size)

    @property
    def model_parallel_size(self) -> int:
        """TP * PP."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size


# ---------------------------------------------------------------------------------------------
# ModelConfig <-> megatron-core TransformerConfig (torch and megatron-core imported on use)


def _activation(name: str) -> Callable[..., Any]:
    """The MLP's activation function for ``ModelConfig.activation``."""
    import torch.nn.functional as F
    from megatron.core.activations import squared_relu

    return {"swiglu": F.silu, "gelu": F.gelu, "squared_relu": squared_relu}[name]


def params_dtype(bf16: bool) -> Any:
    """The parameters' dtype (the model's and its optimizer's): bf16 or fp32."""
    import torch

    return torch.bfloat16 if bf16 else torch.float32


def transformer_config(cfg: ModelConfig, *, bf16: bool = False, fp8: str | None = None,
                       sequence_parallel: bool = False) -> Any:
    """Megatron ``TransformerConfig`` for ``cfg`` under the current parallel state
    (``sequence_parallel`` needs TP > 1, as megatron-core checks)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.heterogeneous.heterogeneous_config import (
        HeterogeneousTransformerConfig,
    )

    dtype = params_dtype(bf16)
    swiglu = cfg.activation == "swiglu"
    config_class = HeterogeneousTransformerConfig if cfg.is_heterogeneous else TransformerConfig
    return config_class(
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
        qk_layernorm=cfg.qk_layernorm,
        init_method_std=cfg.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel,
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
        **moe_fields(cfg), **hetero_fields(cfg),
    )


MODEL_FIELDS = ("vocab_size", "make_vocab_size_divisible_by", "seq_length",
                "max_position_embeddings", "position_embedding_type", "rotary_base",
                "rope_scaling_factor", "share_embeddings_and_output_weights")
"""``ModelConfig`` fields that are ``GPTModel`` arguments, not ``TransformerConfig`` fields."""
UNSUPPORTED = ("multi_latent_attention", "qk_l2_norm",
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
    hetero = bool(getattr(config, "heterogeneous_block_specs", False))
    for name in UNSUPPORTED:
        if getattr(config, name, None) and not (hetero and name == "heterogeneous_block_specs"):
            raise ConfigError(f"TransformerConfig.{name}={getattr(config, name)!r} is not "
                              "supported (Llama-style GPT models only)")
    moe = moe_from_transformer_config(config)
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
        add_qkv_bias=config.add_qkv_bias, qk_layernorm=bool(config.qk_layernorm),
        init_method_std=config.init_method_std, **moe,
        layer_shapes=shapes_from_blocks(config.per_block_parameters) if hetero else None,
        **fields)

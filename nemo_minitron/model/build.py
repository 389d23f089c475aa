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

import torch

from nemo_minitron.config import ConfigError, ModelConfig

# The ModelConfig <-> TransformerConfig mapping is the config package's; also imported from here.
from nemo_minitron.config.model import (  # noqa: F401  (re-exported: their old home)
    model_config,
    params_dtype,
    transformer_config,
)
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


def check_attention(attention: str) -> None:
    """One-line error unless ``attention`` is one of ``ATTENTIONS``."""
    if attention not in ATTENTIONS:
        raise ConfigError(f"attention={attention!r}: must be one of {', '.join(ATTENTIONS)}")


def layer_spec(cfg: ModelConfig, use_te: bool | None = None, attention: str | None = None,
               config=None):
    """The TE spec when TE and a GPU are present, else the local spec with ``attention``
    (default ``DEFAULT_ATTENTION``) as its core attention. A heterogeneous model gets
    megatron-core's heterogeneous spec (this pipeline stage's layers, one spec each) built
    from ``config`` (its ``HeterogeneousTransformerConfig``; None: ``transformer_config``),
    its full blocks with the same local modules as a uniform layer."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    attention = attention or DEFAULT_ATTENTION
    check_attention(attention)
    use_te = te_available() if use_te is None else use_te
    if cfg.is_heterogeneous:
        from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import (
            get_gpt_heterogeneous_layer_spec,
        )

        block = get_gpt_heterogeneous_layer_spec(config or transformer_config(cfg), use_te)
        for spec in block.layer_specs if not use_te else ():
            _local_modules(spec, cfg, attention)
        return block
    if cfg.is_moe:
        from nemo_minitron.model.moe import moe_layer_spec

        spec = moe_layer_spec(cfg, use_te)
        if use_te:
            return spec
    elif use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
    else:
        spec = specs.get_gpt_layer_local_spec(normalization=cfg.normalization,
                                              qk_layernorm=cfg.qk_layernorm)
    _local_modules(spec, cfg, attention)
    return spec


def _local_modules(spec, cfg: ModelConfig, attention: str) -> None:
    """Put the project's modules into a local layer ``spec`` (module docstring): its full
    attention and dense MLP blocks; a no-op or linear block of a heterogeneous layer stays."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP

    from nemo_minitron.model.attention import RopeCachedSelfAttention, SDPAttention
    from nemo_minitron.model.linear import InferenceColumnParallelLinear as Column
    from nemo_minitron.model.linear import InferenceRowParallelLinear as Row
    from nemo_minitron.model.mlp import SwiGLUMLP
    from nemo_minitron.model.norm import swap_torch_norm

    layer = spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        setattr(layer, name, swap_torch_norm(getattr(layer, name)))
    attn, mlp = layer.self_attention, layer.mlp
    if attn.module is SelfAttention:
        attn.module = RopeCachedSelfAttention
        attn.submodules.linear_qkv, attn.submodules.linear_proj = Column, Row
        for norm in ("q_layernorm", "k_layernorm"):
            if getattr(attn.submodules, norm) is IdentityOp:
                # Megatron's own spelling of "none": no module to call per layer and step.
                setattr(attn.submodules, norm, None)
            else:
                setattr(attn.submodules, norm, swap_torch_norm(getattr(attn.submodules, norm)))
        if attention == "sdpa":
            attn.submodules.core_attention = SDPAttention
    if mlp.module is MLP and not cfg.is_moe:  # an MoE layer keeps Megatron's experts
        mlp.module = SwiGLUMLP
        mlp.submodules.linear_fc1, mlp.submodules.linear_fc2 = Column, Row


def training_sequence_parallel(cfg: ModelConfig) -> bool:
    """Whether a model of ``cfg`` is built with sequence parallelism to be trained under the
    current tensor-parallel size: an MoE model under TP > 1 (megatron-core's MoE layer refuses
    to train under TP without it). Dense models train without it (the same numerics, and their
    forward-only paths stay sequence-complete)."""
    from megatron.core import parallel_state as ps

    return cfg.is_moe and ps.get_tensor_model_parallel_world_size() > 1


def build_model(cfg: ModelConfig, *, bf16: bool = False, fp8: str | None = None,
                use_te: bool | None = None, attention: str | None = None,
                sequence_parallel: bool = False):
    """Build this rank's ``GPTModel`` stage (on the rank's device, fp32 or bf16 params).
    ``use_te=False`` forces Megatron's local spec (its checkpoint keys map onto TE's).
    ``attention`` picks the local spec's core attention (``ATTENTIONS``, default
    ``DEFAULT_ATTENTION``); the TE spec ignores it. ``sequence_parallel``: Megatron's sequence
    parallelism under TP > 1 (ignored at TP=1; ``training_sequence_parallel`` says when
    training needs it); its hidden states between layers are this rank's sequence shard."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.model.gpt import MinitronGPTModel

    attention = attention or DEFAULT_ATTENTION
    check_attention(attention)
    if cfg.vocab_size is None:
        raise ConfigError("model.vocab_size is not set (it comes from the tokenizer)")
    cfg.check_layout(ps.get_tensor_model_parallel_world_size(),
                     ps.get_pipeline_model_parallel_world_size(),
                     ps.get_expert_model_parallel_world_size())
    if fp8 is not None and not te_available():
        raise ConfigError("train.fp8 needs Transformer Engine and a GPU")
    from nemo_minitron.model.mlp import quiet_unknown_mlp

    tp = ps.get_tensor_model_parallel_world_size()
    config = transformer_config(cfg, bf16=bf16, fp8=fp8, sequence_parallel=sequence_parallel
                                and tp > 1)
    with quiet_unknown_mlp():
        model = MinitronGPTModel(
            config=config,
            transformer_layer_spec=layer_spec(cfg, use_te, attention=attention, config=config),
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

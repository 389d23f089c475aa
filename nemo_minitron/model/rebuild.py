"""Build a model like a user's own ``GPTModel`` with another ``TransformerConfig``: the same class,
the same layer spec, and ``GPTModel``'s own constructor arguments read back from the instance.

What ``GPTModel`` does not keep as an attribute is taken from its modules: the RoPE
interpolation factor from ``rotary_pos_emb``, the embedding's sequence-parallel scatter from
``embedding``. The rope scaling factor is not kept anywhere, so the rotary inverse frequencies
themselves are copied (the head dimension is the same, so they are too). A subclass whose
constructor needs more than ``GPTModel``'s arguments passes ``build(config) -> model``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from nemo_minitron.config import ConfigError

Build = Callable[[Any], torch.nn.Module]
"""A user's own constructor: pruned ``TransformerConfig`` -> this rank's model stage."""


def gpt_arguments(model: torch.nn.Module) -> dict[str, Any]:
    """``GPTModel.__init__``'s arguments (all but ``config``) as ``model`` was built with them."""
    rotary = getattr(model, "rotary_pos_emb", None)
    embedding = getattr(model, "embedding", None)
    return dict(
        transformer_layer_spec=model.transformer_layer_spec, vocab_size=model.vocab_size,
        max_sequence_length=model.max_sequence_length, pre_process=model.pre_process,
        post_process=model.post_process, fp16_lm_cross_entropy=model.fp16_lm_cross_entropy,
        parallel_output=model.parallel_output,
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent, rotary_base=model.rotary_base,
        rope_scaling=model.rotary_scaling,
        seq_len_interpolation_factor=getattr(rotary, "seq_len_interpolation_factor", None),
        scatter_embedding_sequence_parallel=getattr(
            embedding, "scatter_to_sequence_parallel", True),
        pg_collection=getattr(model, "pg_collection", None),
        vp_stage=getattr(model, "vp_stage", None))


def replace_config(config: Any, **sizes: Any) -> Any:
    """``config`` (a ``TransformerConfig``) with new sizes; every other field as the user set
    it (``TransformerConfig.__post_init__`` runs again on the copy)."""
    return dataclasses.replace(config, **sizes)


def rebuild(model: torch.nn.Module, config: Any, build: Build | None = None) -> torch.nn.Module:
    """A new model of ``type(model)`` with ``model``'s layer spec and ``GPTModel`` arguments and
    ``config``, on ``model``'s device and dtype (weights: whatever the constructor drew; the
caller fills them)."""
    cls = type(model)
    # Built with the user's initialisation (the weights are overwritten): with
    # perform_initialization=False megatron-core's CPU path would not mark the tensor-parallel
    # weights (``tensor_model_parallel``, ``partition_dim``).
    new = _construct(model, cls, config, build)
    if type(new) is not cls:
        raise ConfigError(f"build= returned a {type(new).__name__}, the model is a "
                          f"{cls.__name__}")
    first = next(model.parameters())
    new.to(device=first.device, dtype=first.dtype)
    new.train(model.training)
    old_rotary, new_rotary = (getattr(m, "rotary_pos_emb", None) for m in (model, new))
    if old_rotary is not None and new_rotary is not None:
        new_rotary.inv_freq = old_rotary.inv_freq.clone()  # carries the rope scaling factor
    return new


def _construct(model: torch.nn.Module, cls: type, config: Any,
               build: Build | None) -> torch.nn.Module:
    from nemo_minitron.model.mlp import quiet_unknown_mlp

    with quiet_unknown_mlp():
        if build is not None:
            return build(config)
        try:
            return cls(config=config, **gpt_arguments(model))
        except (TypeError, AttributeError) as e:
            raise ConfigError(f"cannot rebuild {cls.__name__} from GPTModel's constructor "
                              f"arguments ({str(e).splitlines()[0]}); pass build=, a function "
                              f"of the pruned TransformerConfig that returns your model") from None

"""The local spec's norm: torch's ``LayerNorm`` / ``RMSNorm``, also under sequence parallelism.

megatron-core 0.16.1's ``WrappedTorchNorm`` (the local spec's norm without apex) asserts
``sequence_parallel`` off, yet its MoE layer needs sequence parallelism to train under tensor
parallelism. A norm acts on each token alone, so on a sequence shard it is exact; only its
weight and bias gradients are partial sums over this rank's tokens. Marking them
``sequence_parallel`` (what Megatron's own TE and apex norms do) makes ``finalize_model_grads``
sum them over the tensor-parallel group. The modules are torch's own: same parameters, same
checkpoint keys, same numerics as ``WrappedTorchNorm``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


class TorchNorm:
    """``LayerNorm`` or ``RMSNorm`` (``config.normalization``) of ``hidden_size``, its
    parameters marked ``sequence_parallel`` as ``config`` says; Megatron's norm signature."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5,
                persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                normalization: str = "LayerNorm") -> torch.nn.Module:
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds or config.layernorm_zero_centered_gamma:
            raise ValueError(f"normalization={config.normalization!r} (zero-centred gamma: "
                             f"{config.layernorm_zero_centered_gamma}): LayerNorm or RMSNorm only")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def swap_torch_norm(norm: Any) -> Any:
    """``TorchNorm`` in place of megatron-core's ``WrappedTorchNorm``; any other norm (apex's,
    TE's, none) is kept."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return TorchNorm if norm is WrappedTorchNorm else norm


def block_spec(spec: Any, config: Any, vp_stage: int | None = None,
               pp_rank: int | None = None) -> Any:
    """The ``TransformerBlockSubmodules`` megatron-core would make of a ``GPTModel``'s
    ``spec`` (a layer spec: one per layer of this stage; or a block), its final norm swapped by
    ``swap_torch_norm``. Any other spec is returned as is."""
    from megatron.core.transformer import transformer_block as tb
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import BaseTransformerLayer

    if isinstance(spec, tb.TransformerBlockSubmodules):
        return dataclasses.replace(spec, layer_norm=swap_torch_norm(spec.layer_norm))
    if isinstance(spec, ModuleSpec) and isinstance(spec.module, type) \
            and issubclass(spec.module, BaseTransformerLayer):
        return tb.TransformerBlockSubmodules(
            layer_specs=[spec] * tb.get_num_layers_to_build(config, vp_stage, pp_rank),
            layer_norm=swap_torch_norm(tb.LayerNormImpl))
    return spec

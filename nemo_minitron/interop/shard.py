"""Fill this rank's ``GPTModel`` stage from full (TP=1) tensors, one parameter at a time.

Each parameter asks for the full tensor of its name (with its global layer index, so PP stages
read only their own layers) and keeps its tensor-parallel slice. The slice follows the
parameter's own Megatron attributes (``tensor_model_parallel``, ``partition_dim``); the one
non-contiguous slice is SwiGLU ``linear_fc1``, whose rank holds ``[gate shard ; up shard]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.model.build import unwrap

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

FullTensor = Callable[[str, "int | None"], torch.Tensor]


def tp_slice(full: torch.Tensor, param: torch.nn.Parameter, name: str, cfg: ModelConfig,
             rank: int, size: int) -> torch.Tensor:
    """This tensor-parallel rank's part of ``full`` for ``param``."""
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if cfg.activation == "swiglu" and name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(size, dim)[rank], up.chunk(size, dim)[rank]], dim)
    return full.chunk(size, dim)[rank]


def fill_model(model: torch.nn.Module, cfg: ModelConfig, full_tensor: FullTensor) -> None:
    """Copy every parameter of this rank's stage from ``full_tensor(name, global_layer)``."""
    from megatron.core import parallel_state as ps

    inner = unwrap(model)
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for name, param in inner.named_parameters():
        m = _LAYER.match(name)
        if m is None:
            layer, local = None, name
        else:
            layer = inner.decoder.layers[int(m.group(1))].layer_number - 1
            local = m.group(2)
        part = tp_slice(full_tensor(local, layer), param, name, cfg, rank, size)
        if tuple(part.shape) != tuple(param.shape):
            raise ConfigError(f"weight {name!r} (layer {layer}) has shape {list(part.shape)} "
                              f"here, the model needs {list(param.shape)}")
        with torch.no_grad():
            param.copy_(part.to(param.dtype))

"""Between a TP/PP-sharded ``GPTModel`` and its full, unsharded state dict.

The full state dict has the keys and layouts of the same model built with TP=1 and PP=1:
global layer numbers, ``linear_qkv`` rows interleaved per query group, SwiGLU ``linear_fc1`` rows
``[gate; up]``, the whole (padded) vocabulary, and no ``output_layer.weight`` when it is tied to
the word embeddings. Pruning slices that layout (``prune.apply``) and the result is scattered
into a model built under any TP/PP, which is how kept units end up balanced over the ranks: the
pruned tensor is simply re-split evenly.

Megatron marks every tensor-parallel parameter with ``tensor_model_parallel`` and
``partition_dim``; everything else is replicated over TP. Concatenating TP shards along
``partition_dim`` gives the TP=1 tensor for every weight but SwiGLU ``linear_fc1`` (the dense
MLP's, every expert's and the shared expert's: ``model.layouts.fc1_tp_shard``).

``fill_model`` fills a stage from any source of full tensors, one at a time (checkpoint import
streams them from safetensors); ``load_full_state_dict`` from a dict.

Memory: ``gather_full_state_dict`` puts the full model on every rank's CPU (importance baselines,
merging in memory, tests); pruning streams one layer at a time instead (``model.stream``), with
``gather_tp`` gathering one tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.model import layouts
from nemo_minitron.model.build import unwrap

FullTensor = Callable[[str, "int | None"], torch.Tensor]


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This stage's parameters (with their Megatron attributes) by state-dict key."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if not k.endswith("_extra_state")}


def _global_key(key: str, offset: int) -> str:
    parsed = layouts.split_layer_key(key)
    return key if parsed is None else layouts.layer_key(parsed[0] + offset, parsed[1])


def _is_glu_fc1(name: str, gated: bool) -> bool:
    """SwiGLU ``linear_fc1`` weight/bias of any MLP, expert or shared expert."""
    return gated and layouts.is_fc1(name)


def _tied(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "share_embeddings_and_output_weights", False))


def gather_tp(p: torch.Tensor, name: str, gated: bool, expert: bool = False) -> torch.Tensor:
    """The full (TP=1) tensor of this rank's parameter ``p`` (state-dict key or layer-local
    ``name``): a collective over the tensor-parallel group (``expert``: the
    expert-tensor-parallel group of a routed expert's tensor) for a tensor-parallel parameter,
    the parameter itself (no copy) otherwise."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = (ps.get_expert_tensor_parallel_world_size() if expert
          else ps.get_tensor_model_parallel_world_size())
    t = p.detach()
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return t
    group = (ps.get_expert_tensor_parallel_group() if expert
             else ps.get_tensor_model_parallel_group())
    if p.partition_dim == 0:
        # Gathered in place into the full tensor (no second full-size copy): its row blocks
        # are contiguous; a SwiGLU fc1 is gathered half by half ([gate_r; up_r] per rank).
        full = t.new_empty((t.shape[0] * tp, *t.shape[1:]))
        halves = layouts.fc1_views(t) if _is_glu_fc1(name, gated) else (t,)
        for half, block in zip(halves, full.chunk(len(halves))):
            dist.all_gather(list(block.chunk(tp)), half.contiguous(), group=group)
        return full
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=p.partition_dim)


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every rank gets the full TP=1/PP=1 state dict of ``model`` (CPU tensors)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    offset = layouts.layer_offset(model)
    local: dict[str, torch.Tensor] = {}
    for key, p in _tensors(model).items():
        if key == "output_layer.weight" and _tied(model):
            continue  # the word embeddings, held by the first stage
        t = gather_tp(p, key, model.config.gated_linear_unit)
        local[_global_key(key, offset)] = t.cpu().clone()
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return local
    stages: list[dict[str, torch.Tensor] | None] = [None] * pp
    dist.all_gather_object(stages, local, group=ps.get_pipeline_model_parallel_group())
    return {k: v for stage in stages for k, v in (stage or {}).items()}


def tp_slice(full: torch.Tensor, param: torch.nn.Parameter, name: str, cfg: ModelConfig,
             rank: int, size: int) -> torch.Tensor:
    """This tensor-parallel rank's part of ``full`` for ``param``."""
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if _is_glu_fc1(name, layouts.gated(cfg)):
        return layouts.fc1_tp_shard(full, rank, size)
    return full.chunk(size, dim)[rank]


def fill_model(model: torch.nn.Module, cfg: ModelConfig, full_tensor: FullTensor) -> None:
    """Copy every parameter of this rank's stage from ``full_tensor(name, global_layer)``."""
    from megatron.core import parallel_state as ps

    inner = unwrap(model)
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for name, param in inner.named_parameters():
        parsed = layouts.split_layer_key(name)
        if parsed is None:
            layer, local = None, name
        else:
            layer = layouts.global_layer(inner.decoder.layers[parsed[0]])
            local = parsed[1]
        part = tp_slice(full_tensor(local, layer), param, name, cfg, rank, size)
        if tuple(part.shape) != tuple(param.shape):
            raise ConfigError(f"weight {name!r} (layer {layer}) has shape {list(part.shape)} "
                              f"here, the model needs {list(param.shape)}")
        with torch.no_grad():
            param.copy_(part.to(param.dtype))


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor],
                         cfg: ModelConfig) -> None:
    """Copy this rank's shard of every parameter of ``model`` out of a full state dict."""
    def tensor(name: str, layer: int | None) -> torch.Tensor:
        key = name if layer is None else layouts.layer_key(layer, name)
        if key == "output_layer.weight" and key not in full and _tied(unwrap(model)):
            key = "embedding.word_embeddings.weight"
        if key not in full:
            raise KeyError(f"the full state dict has no {key!r}")
        return full[key]

    fill_model(model, cfg, tensor)

"""Fill one model from another under the same TP/PP layout, one layer at a time, without ever
holding more than one full (TP=1) tensor of a layer per rank.

For each layer of the new model (its global index ``j``, made from the old model's global layer
``s``): the ranks of the pipeline stage that holds ``s`` gather its full tensors, one at a
time, within their tensor-parallel group (``full_state.gather_tp``), transform them (pruning:
slice), and take each new tensor's TP shard (``full_state.tp_slice``, the even re-split). If
the new layer lives on another stage, each such rank sends its shards to the rank of the same
TP (and DP) rank on that stage, point to point. Which stage holds which layer is exchanged
first (a list of ints per stage), so any pipeline split megatron-core computes is followed.

Under expert parallelism (EP; PP=1) a rank holds some of each MoE layer's experts (local index
``l`` on EP rank ``r`` is global expert ``r * E_local + l``), and a kept expert may live on
another EP rank in the new model. Each expert tensor is then gathered over the EP group, one
local index and name at a time, so every rank sees that tensor of every expert once; ``fn`` and
``rename`` see global expert names, and each rank keeps the new experts it holds.

Tensors outside the layers (embeddings, output layer, final norm) stay on their stage; their
transform works on this rank's shard directly (pruning slices only the hidden dimension, which
no vocab-parallel weight is split along).

Peak memory per rank: the old and new shards plus one full tensor of a layer and its transformed
copy (and, while the new model is built, whatever its constructor allocates).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.model import layouts
from nemo_minitron.model.full_state import gather_tp, tp_slice

LayerFn = Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]
"""(full tensors of an old layer by layer-local name, its global index) -> the new layer's
(called with one tensor at a time)."""
Rename = Callable[[str, int], "str | None"]
"""(layer-local name of an old layer's tensor, its global index) -> the new layer's name for it
(None: it has no counterpart, e.g. a removed expert)."""
OtherFn = Callable[[str, torch.Tensor], torch.Tensor]
"""(state-dict key, this rank's shard of a tensor outside the layers) -> the new shard."""


def _params(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(sorted(module.named_parameters()))


def _stage_layers(model: torch.nn.Module) -> list[list[int]]:
    """Global layer indices held by each pipeline stage (the same on every rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    mine = sorted(layouts.global_layers(model))
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return [mine]
    stages: list[list[int] | None] = [None] * pp
    dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
    return [s or [] for s in stages]


def _stage_of(stages: list[list[int]], layer: int) -> int:
    return next(i for i, held in enumerate(stages) if layer in held)


def _copy(param: torch.nn.Parameter, value: torch.Tensor, what: str) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise ConfigError(f"{what} has shape {list(value.shape)}, the new model needs "
                          f"{list(param.shape)}")
    with torch.no_grad():
        param.copy_(value)


def fill_others(old: torch.nn.Module, new: torch.nn.Module, fn: OtherFn) -> None:
    """Every parameter of ``new`` outside its layers from ``fn`` of ``old``'s shard (local)."""
    have = old.state_dict(keep_vars=True)
    for key, param in new.named_parameters():
        if layouts.split_layer_key(key) is None:
            _copy(param, fn(key, have[key].detach()), key)


def stream_layers(old: torch.nn.Module, new: torch.nn.Module, sources: list[int], fn: LayerFn,
                  new_cfg: ModelConfig, rename: Rename | None = None) -> None:
    """Fill every layer ``j`` of ``new`` from ``fn`` of the full layer ``sources[j]`` of
    ``old`` (module docstring); ``rename``: which new tensor each old one fills (default: the
    one of the same name). A collective: every rank of the model-parallel group calls it."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    stage = ps.get_pipeline_model_parallel_rank()
    ep = ps.get_expert_model_parallel_world_size()
    # prune.apply refuses EP with PP (in one line, before building): experts stay on the stage
    assert ep == 1 or ps.get_pipeline_model_parallel_world_size() == 1
    pp_ranks = (dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
                if ps.get_pipeline_model_parallel_world_size() > 1 else [dist.get_rank()])
    old_stages, new_stages = _stage_layers(old), _stage_layers(new)
    old_layers, new_layers = layouts.global_layers(old), layouts.global_layers(new)
    gated = old.config.gated_linear_unit
    wire = next(new.parameters()).dtype
    for j, s in enumerate(sources):
        src, dst = _stage_of(old_stages, s), _stage_of(new_stages, j)
        if stage == src:
            # One tensor at a time: the transform's rules are per weight, so at most one full
            # tensor (and its slice) is held beside the shards.
            params = _params(old_layers[s])
            experts = {o for o in params if layouts.split_expert(o)} if ep > 1 else set()
            # In the new names' order: the order in which the receiving stage reads them.
            names = sorted((n, o) for o in params if o not in experts
                           and (n := o if rename is None else rename(o, s)) is not None)
            for new_name, name in names:
                p = params[name]
                full = gather_tp(p, name, gated)
                # Same spec on both sides: the old layer's parameter carries the TP attributes.
                shard = tp_slice(fn({name: full}, s)[name], p, new_name, new_cfg, tp_rank, tp)
                del full
                if dst == stage:
                    _copy(_params(new_layers[j])[new_name], shard,
                          layouts.layer_key(j, new_name))
                else:
                    dist.send(shard.to(wire).contiguous(), dst=pp_ranks[dst])
                del shard
            if experts:  # PP=1 under EP (prune.apply): this stage is the new layer's
                _stream_experts(params, sorted(experts), _params(new_layers[j]), s, fn, rename,
                                new_cfg, gated, layouts.layer_key(j, ""))
        elif stage == dst:
            for param in _params(new_layers[j]).values():
                buf = torch.empty(param.shape, dtype=wire, device=param.device)
                dist.recv(buf, src=pp_ranks[src])
                _copy(param, buf, "")


def _stream_experts(params: dict[str, torch.nn.Parameter], names: list[str],
                    new_params: dict[str, torch.nn.Parameter], layer: int, fn: LayerFn,
                    rename: Rename | None, new_cfg: ModelConfig, gated: bool, where: str) -> None:
    """Fill the new layer's experts on this EP rank from every EP rank's old ones (module
    docstring): ``names`` are this rank's old expert tensors, the same local names on every EP
    rank of the group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_expert_model_parallel_group()
    ep, ep_rank = dist.get_world_size(group), ps.get_expert_model_parallel_rank()
    tp_rank = ps.get_expert_tensor_parallel_rank()
    tp = ps.get_expert_tensor_parallel_world_size()
    old_local = len({layouts.split_expert(n)[0] for n in names})  # type: ignore[index]
    new_local = len({x[0] for n in new_params if (x := layouts.split_expert(n))})
    for name in names:
        local, rest = layouts.split_expert(name)  # type: ignore[misc]
        p = params[name]
        full = gather_tp(p, name, gated, expert=True)
        every = [torch.empty_like(full) for _ in range(ep)]
        dist.all_gather(every, full.contiguous(), group=group)
        del full
        for r, t in enumerate(every):
            old = f"{layouts.EXPERT_PREFIX}{r * old_local + local}.{rest}"
            new = old if rename is None else rename(old, layer)
            if new is None:
                continue
            e, _ = layouts.split_expert(new)  # type: ignore[misc]
            if e // new_local != ep_rank:
                continue  # another EP rank holds it in the new model
            mine = f"{layouts.EXPERT_PREFIX}{e % new_local}.{rest}"
            shard = tp_slice(fn({old: t}, layer)[old], p, mine, new_cfg, tp_rank, tp)
            _copy(new_params[mine], shard, where + mine)

"""Importance of a mixture-of-experts layer's units, from the same forward pass as every other
axis (hooks on megatron-core's ``SequentialMLP`` experts and shared expert).

Megatron calls each expert as ``expert(tokens [n_e, h], probs [n_e])`` with the tokens routed
to it and their routing weights, and the expert multiplies its activations by the weights
before ``linear_fc2`` (``MLP.forward``'s ``per_token_scale``): its output is the
router-weighted output ``w_te * E_e(x_t)``. Per layer and expert:
- ``experts``: sum over tokens of the L2 norm of that output, over the tokens the router saw
  (Model Optimizer's criterion: a token not routed to the expert counts 0);
- ``expert_mass``: the router's probability mass, the mean routing weight ``w_te``;
- ``expert_load``: the share of tokens routed to the expert (they sum to ``moe_router_topk``);
- ``expert_channels``: per expert and channel of ``moe_ffn_hidden_size``, the root of the sum
  of squares of the expert's ``linear_fc2`` input (router-weighted) over the tokens routed to
  it, per token the router saw;
- ``expert_ffn``: per channel, the same over every expert of the layer (the root of the sum of
  the squared ``expert_channels``): one index set for all experts, Model Optimizer's rule.
``shared_expert_ffn`` scores the shared expert's channels as the dense ``ffn_hidden_size``.

Under TP each rank's expert sees the same token stream (the allgather dispatcher gathers the
TP ranks' tokens, copies of each other without sequence parallelism: hence means over the
stream's tokens) with a shard of the channels; its output is a partial sum, so the norms are
taken after an all-reduce over TP (in the hook: every TP rank runs every expert, also with no
tokens). ``finalize`` then sums over DP, concatenates channels over TP and layers over PP.

Under expert parallelism (EP) a rank holds ``num_moe_experts / EP`` experts, and the dispatcher
brings them the tokens of every rank of its EP group routed to them. Their sums are therefore
summed only over the ranks that hold the same experts (megatron-core's expert-data-parallel
group) and concatenated over the EP group in its rank order (EP rank ``r`` holds experts
``r * E / EP ...``); the shared expert runs on each rank's own tokens, summed over DP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from nemo_minitron.importance.aggregate import Aggregator, gather_cat


class ExpertStats:
    """Running sums of one MoE layer's expert statistics on this rank."""

    def __init__(self, mlp: torch.nn.Module, agg: Any) -> None:
        experts = list(mlp.experts.local_experts)
        e = len(experts)
        self.sums = torch.zeros(3, e, dtype=torch.float64)  # output norm, weight, tokens
        # sums of squares per expert and channel (this TP rank's channels)
        self.ffn = torch.zeros(e, experts[0].linear_fc2.weight.shape[1], dtype=torch.float64)
        shared = getattr(mlp, "shared_experts", None)
        self.shared: Aggregator | None = None if shared is None else agg(
            shared.linear_fc2.weight.shape[1])
        self.topk = mlp.config.moe_router_topk

    def hooks(self, mlp: torch.nn.Module, tp_group: Any) -> list[Any]:
        """Register this layer's hooks; returns their handles."""
        handles = []
        for e, expert in enumerate(mlp.experts.local_experts):
            handles += [expert.register_forward_hook(self._expert_hook(e, tp_group)),
                        expert.linear_fc2.register_forward_pre_hook(self._ffn_hook(e))]
        if self.shared is not None:
            shared = self.shared
            handles.append(mlp.shared_experts.linear_fc2.register_forward_pre_hook(
                lambda _m, args: shared.update(args[0].abs())))
        return handles

    def _expert_hook(self, e: int, tp_group: Any):
        def hook(_mod, args, out):
            y = out[0].detach().float()
            if dist.get_world_size(tp_group) > 1:  # partial sums of linear_fc2 over TP
                y = y.clone()
                dist.all_reduce(y, group=tp_group)
            probs = args[1].detach() if len(args) > 1 and args[1] is not None \
                else torch.ones(y.shape[0])
            self.sums[:, e] += torch.stack([
                torch.linalg.vector_norm(y, dim=-1).double().sum().cpu(),
                probs.double().sum().cpu(), torch.tensor(float(y.shape[0]))])
        return hook

    def _ffn_hook(self, e: int):
        def hook(_mod, args):
            self.ffn[e] += args[0].detach().float().pow(2).sum(0).double().cpu()
        return hook

    def all_reduce(self, group: Any) -> None:
        """Sum the running state over ``group`` (data-parallel ranks); under expert parallelism
        the experts' over the ranks holding the same experts, then gathered over EP (module
        docstring): every rank ends with every expert's."""
        from megatron.core import parallel_state as ps

        if self.shared is not None:
            self.shared.all_reduce(group)
        ep_group = ps.get_expert_model_parallel_group()
        ep = dist.get_world_size(ep_group)
        same_experts = ps.get_expert_data_parallel_group() if ep > 1 else group
        if dist.get_world_size(same_experts) > 1:
            packed = torch.cat([self.sums.flatten(), self.ffn.flatten()])
            dist.all_reduce(packed, group=same_experts)
            self.sums = packed[:self.sums.numel()].view_as(self.sums)
            self.ffn = packed[self.sums.numel():].view_as(self.ffn)
        if ep > 1:
            self.sums = gather_cat(self.sums, ep_group, dim=1)
            self.ffn = gather_cat(self.ffn, ep_group, dim=0)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[3, experts]`` (output norm, mass, load: means over tokens), ``[channels]`` (the
        layer's, this TP rank's), ``[shared channels]`` (empty without a shared expert) and
        ``[experts, channels]`` (each expert's)."""
        tokens = (self.sums[2].sum() / self.topk).clamp(min=1)
        shared = self.shared.result() if self.shared is not None else torch.zeros(0)
        return ((self.sums / tokens).float(), (self.ffn.sum(0) / tokens).sqrt().float(), shared,
                (self.ffn / tokens).sqrt().float())

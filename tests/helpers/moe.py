"""A torch-only recomputation of megatron-core's MoE layer from its weights: the independent
reference of the MoE model and importance tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, fc1: torch.Tensor) -> torch.Tensor:
    """The SwiGLU activations ``silu(gate) * up`` of ``x [n, h]`` under ``fc1 [2f, h]``."""
    gate, up = (x @ fc1.T).chunk(2, -1)
    return F.silu(gate) * up


def route(logits: torch.Tensor, k: int, pre_softmax: bool) -> torch.Tensor:
    """Routing weights ``[n, experts]`` of router logits ``[n, experts]`` (0 where not
    routed)."""
    if pre_softmax:  # Qwen2-MoE: softmax over all, then the top-k
        weights, chosen = torch.softmax(logits, -1).topk(k, -1)
    else:  # Mixtral: the top-k logits, softmax over them
        top, chosen = logits.topk(k, -1)
        weights = torch.softmax(top, -1)
    return torch.zeros_like(logits).scatter(1, chosen, weights)


def routing(mlp, h: torch.Tensor) -> torch.Tensor:
    """Routing weights ``[n, experts]`` of tokens ``h [n, hidden]`` (0 where not routed)."""
    return route(h @ mlp.router.weight.T, mlp.config.moe_router_topk,
                 mlp.config.moe_router_pre_softmax)


def router_losses(weight: torch.Tensor, h: torch.Tensor, k: int,
                  pre_softmax: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(switch loss, z-loss)`` of a router ``weight [experts, hidden]`` on tokens
    ``h [n, hidden]``, unweighted: the switch loss ``E * sum_i f_i P_i`` (``f_i`` the share of
    the ``k * n`` assignments expert i got, ``P_i`` its mean probability over all experts) and
    the z-loss ``mean(logsumexp(logits)^2)``."""
    logits = h @ weight.T
    n, num_experts = logits.shape
    f = (route(logits.detach(), k, pre_softmax) > 0).sum(0).to(h.dtype) / (n * k)
    switch = num_experts * (f * torch.softmax(logits, -1).mean(0)).sum()
    return switch, torch.logsumexp(logits, -1).square().mean()


def expert_activations(mlp, h: torch.Tensor) -> list[torch.Tensor]:
    """Per expert: its SwiGLU activations ``[n, f]`` on every token (routed or not)."""
    return [swiglu(h, e.linear_fc1.weight) for e in mlp.experts.local_experts]


def moe_output(mlp, h: torch.Tensor) -> torch.Tensor:
    """The layer's output ``[n, hidden]``: routed experts' weighted sum plus the shared
    expert (sigmoid-gated when configured)."""
    w = routing(mlp, h)
    out = sum(w[:, e:e + 1] * (a @ expert.linear_fc2.weight.T) for e, (a, expert) in
              enumerate(zip(expert_activations(mlp, h), mlp.experts.local_experts)))
    shared = getattr(mlp, "shared_experts", None)
    if shared is not None:
        y = swiglu(h, shared.linear_fc1.weight) @ shared.linear_fc2.weight.T
        if mlp.config.moe_shared_expert_gate:
            y = torch.sigmoid(h @ shared.gate_weight.T) * y
        out = out + y
    return out

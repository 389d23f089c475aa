"""Depth importance by LM loss: how much the validation loss rises when a layer, or a
contiguous block of ``k`` layers, is skipped (the residual stream passes through unchanged).

Skipping happens in place on the loaded model (each stage skips the layers it holds), so it
works under any TP/PP layout and needs no copies of the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from nemo_minitron.model.build import unwrap
from nemo_minitron.model.forward import lm_loss
from nemo_minitron.model.layouts import global_layer


@contextlib.contextmanager
def skip_layers(model: torch.nn.Module, layers: Iterable[int]) -> Iterator[None]:
    """Make the given 0-based global layers identities while the context is open."""
    wanted = set(layers)
    patched = []
    for layer in unwrap(model).decoder.layers:
        if global_layer(layer) in wanted:
            def identity(*args, **kwargs):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                return hidden, kwargs.get("context")
            layer.forward = identity
            patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward  # back to the class method


def block_loss_increase(model: torch.nn.Module, tokens: torch.Tensor, micro_batch_size: int,
                        block: int, num_layers: int) -> torch.Tensor:
    """``[num_layers - block + 1]``: LM-loss increase when layers ``[i, i + block)`` are
    skipped, for every start ``i``."""
    base = lm_loss(model, tokens, micro_batch_size)
    out = []
    for start in range(num_layers - block + 1):
        with skip_layers(model, range(start, start + block)):
            out.append(lm_loss(model, tokens, micro_batch_size) - base)
    return torch.tensor(out)


def angular_distance_sums(bounds: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``[B, B]``: for hidden states ``bounds [B, s, b, h]`` (B layer boundaries of one batch),
    the sum over tokens of ``arccos(cos(bounds[i], bounds[j])) / pi`` for every pair."""
    B = bounds.shape[0]
    flat = bounds.reshape(B, -1, bounds.shape[-1])
    out = torch.zeros(B, B, dtype=torch.float64)
    for x in flat.split(chunk, dim=1):  # bounded float64 memory on large models
        u = torch.nn.functional.normalize(x.double(), dim=-1).transpose(0, 1)  # [t, B, h]
        cos = (u @ u.transpose(1, 2)).clamp(-1.0, 1.0)  # [t, B, B]
        out += (torch.arccos(cos) / torch.pi).sum(0).cpu()
    out.fill_diagonal_(0.0)  # arccos of a rounded 1.0 is not exactly 0
    return out


def block_angular_distance(distance: torch.Tensor, block: int) -> torch.Tensor:
    """``[num_layers - block + 1]``: from the ``[num_layers + 1]^2`` boundary distance matrix,
    the distance between the hidden states entering layers ``i`` and ``i + block`` (the
    SDD paper's criterion, arXiv 2410.09982), for every start ``i``."""
    n = distance.shape[0] - 1
    return torch.stack([distance[i, i + block] for i in range(n - block + 1)])

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


def boundary_distance_sums(bounds: torch.Tensor, chunk_bytes: int = 1 << 26
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """For the hidden states ``bounds [tokens, B, h]`` at B layer boundaries, the sums over
    tokens of ``arccos(cos)/pi`` (angular distance) and of ``1 - cos`` for every pair of
    boundaries: two ``[B, B]`` float64 tensors on the CPU.

    Cosines come from one float64 Gram matrix per token (``B^2 h`` multiply-adds, little next
    to the layers): near cos = 1, the nearly-identity layers depth pruning looks for, arccos
    and ``1 - cos`` amplify rounding, and a float32 Gram loses most of their digits there.
    Zero vectors count as cos = 0, as in ``cosine_similarity``. Tokens are taken in chunks of
    at most ``chunk_bytes`` of float64."""
    t, B, h = bounds.shape
    angle = torch.zeros(B, B, dtype=torch.float64, device=bounds.device)
    gap = torch.zeros_like(angle)
    for x in bounds.split(max(1, chunk_bytes // (8 * B * h))):
        x = x.double()
        gram = x @ x.transpose(1, 2)  # [t, B, B]
        norm = gram.diagonal(dim1=1, dim2=2).sqrt().clamp(min=1e-8)  # cosine_similarity's eps
        cos = gram / (norm.unsqueeze(2) * norm.unsqueeze(1))
        gap += (1.0 - cos).sum(0)
        angle += torch.arccos(cos.clamp(-1.0, 1.0)).sum(0)
    angle /= torch.pi
    angle.fill_diagonal_(0.0)  # arccos of a rounded 1.0 is not exactly 0
    gap.fill_diagonal_(0.0)
    return angle.cpu(), gap.cpu()


def block_angular_distance(distance: torch.Tensor, block: int) -> torch.Tensor:
    """``[num_layers - block + 1]``: from the ``[num_layers + 1]^2`` boundary distance matrix,
    the distance between the hidden states entering layers ``i`` and ``i + block`` (the
    SDD paper's criterion, arXiv 2410.09982), for every start ``i``."""
    n = distance.shape[0] - 1
    return torch.stack([distance[i, i + block] for i in range(n - block + 1)])

"""Aggregation of activation magnitudes over sequence and batch (the paper's ablation).

An activation tensor ``[s, b, units]`` is first reduced over the sequence (``seq_agg``) to
``[b, units]``, then accumulated over every calibration sequence (``batch_agg``). Each is one
of ``mean``, ``l2`` (root of the sum of squares) or ``var`` (population variance). Running
sums are kept in float64 so the result does not depend on how the calibration set is split
into micro-batches or across data-parallel ranks (``all_reduce`` the state, then ``result``);
the reduction over one sequence runs in float32 (no float64 copy of the activations; its
rounding, ~1e-7 relative, is far below what the scores resolve).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

Agg = Literal["mean", "l2", "var"]
AGGREGATIONS: tuple[str, ...] = ("mean", "l2", "var")


def reduce_sequence(x: torch.Tensor, how: Agg) -> torch.Tensor:
    """``[s, b, u]`` -> ``[b, u]``, reduced in float32 (or x's wider type), returned in
    float64."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    if how == "mean":
        return x.mean(dim=0, dtype=dtype).double()
    x = x.to(dtype)
    if how == "l2":
        return x.pow(2).sum(dim=0).sqrt().double()
    if how == "var":
        return x.var(dim=0, unbiased=False).double()
    raise ValueError(f"aggregation {how!r} must be one of {AGGREGATIONS}")


class Aggregator:
    """Accumulates per-unit scores over sequences; ``result()`` gives ``[units]``."""

    def __init__(self, units: int, batch_agg: Agg = "l2", seq_agg: Agg = "mean"):
        for name, how in (("batch_agg", batch_agg), ("seq_agg", seq_agg)):
            if how not in AGGREGATIONS:
                raise ValueError(f"{name}={how!r} must be one of {list(AGGREGATIONS)}")
        self.batch_agg, self.seq_agg = batch_agg, seq_agg
        # [sum, sum of squares] per unit, and the number of sequences.
        self.state = torch.zeros(2, units, dtype=torch.float64)
        self.count = torch.zeros(1, dtype=torch.float64)

    def update(self, magnitudes: torch.Tensor) -> None:
        """Add ``[s, b, units]`` non-negative activation magnitudes."""
        per_seq = reduce_sequence(magnitudes.detach(), self.seq_agg).cpu()
        self.state[0] += per_seq.sum(dim=0)
        self.state[1] += per_seq.pow(2).sum(dim=0)
        self.count += per_seq.shape[0]

    def all_reduce(self, group: dist.ProcessGroup | None) -> None:
        """Sum the running state over ``group`` (data-parallel ranks)."""
        if group is None or dist.get_world_size(group) == 1:
            return
        packed = torch.cat([self.state.flatten(), self.count])
        dist.all_reduce(packed, group=group)
        self.state = packed[:-1].view_as(self.state)
        self.count = packed[-1:]

    def result(self) -> torch.Tensor:
        """Scores ``[units]`` in float32."""
        n = self.count.clamp(min=1.0)
        if self.batch_agg == "mean":
            out = self.state[0] / n
        elif self.batch_agg == "l2":
            out = self.state[1].sqrt()
        else:
            mean = self.state[0] / n
            out = (self.state[1] / n - mean.pow(2)).clamp(min=0.0)
        return out.float()


def gather_cat(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """All-gather ``x`` over ``group`` and concatenate in rank order along ``dim``."""
    n = dist.get_world_size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)

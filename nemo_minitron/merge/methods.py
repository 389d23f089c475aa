"""Merge arithmetic on one logical tensor, with mergekit's formulas and order of operations.

Inputs are views (possibly strided) into the tensors just read; the result overwrites the
first input in place. Work goes through blocks of about ``BLOCK`` elements in float32
(float64 for float64 inputs), so scratch memory stays bounded whatever the size of the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

BLOCK = 1 << 16  # elements per block: scratch stays far below the tensor


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _blocks(shape: tuple[int, ...]) -> Iterator[tuple[int | slice, ...]]:
    """Indices of consecutive blocks of at most about ``BLOCK`` elements (whole rows of the
    last axes where they fit, else recursing into the first axis)."""
    if not shape:
        yield ()
        return
    per_row = math.prod(shape[1:])
    if per_row <= BLOCK or len(shape) == 1:
        step = max(1, BLOCK // max(1, per_row))
        for s in range(0, shape[0], step):
            yield (slice(s, s + step),)
        return
    for i in range(shape[0]):
        for sub in _blocks(shape[1:]):
            yield (i, *sub)


def _slerp_coefficients(t: float, dot: torch.Tensor, threshold: float
                        ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(coefficient of the base, of the other, colinear fallback used)."""
    tt = torch.tensor(t, dtype=dot.dtype)
    dot = dot.clamp(-1, 1)
    linear = bool(dot.abs() > threshold)
    if linear:
        return 1 - tt, tt, True
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - tt) * theta) / sin_theta, torch.sin(tt * theta) / sin_theta, False


def slerp_(t: float, a: torch.Tensor, b: torch.Tensor, *, dot_threshold: float = 0.9995,
           eps: float = 1e-8, origin: torch.Tensor | None = None) -> bool:
    """``a <- slerp(t, a, b)``: the angle between the flattened, normalized tensors, applied
    to the unnormalized ones; linear interpolation when ``|cos| > dot_threshold``. With
    ``origin``, interpolate the task vectors ``a - origin`` and ``b - origin`` and add
    ``origin`` back. Identical inputs are returned unchanged (a model merged with itself is
    itself, bit for bit). Returns whether the colinear fallback was taken."""
    dt = _work_dtype(a)

    def parts(s: tuple[int | slice, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = a[s].to(dt), b[s].to(dt)
        if origin is not None:
            o = origin[s].to(dt)
            x, y = x - o, y - o
        return x, y

    na_parts, nb_parts = [], []
    for s in _blocks(tuple(a.shape)):
        x, y = parts(s)
        na_parts.append(torch.linalg.vector_norm(x))
        nb_parts.append(torch.linalg.vector_norm(y))
    na = torch.linalg.vector_norm(torch.stack(na_parts))
    nb = torch.linalg.vector_norm(torch.stack(nb_parts))
    na = torch.where(na > eps, na, 1)
    nb = torch.where(nb > eps, nb, 1)
    dot = torch.zeros((), dtype=dt)
    for s in _blocks(tuple(a.shape)):
        x, y = parts(s)
        dot = dot + ((x / na) * (y / nb)).sum()
    ca, cb, linear = _slerp_coefficients(t, dot, dot_threshold)
    if linear and all(torch.equal(*parts(s)) for s in _blocks(tuple(a.shape))):
        return True  # identical tensors: (1 - t) x + t x would round; x is the answer
    for s in _blocks(tuple(a.shape)):
        x, y = parts(s)
        res = ca * x + cb * y
        if origin is not None:
            res = origin[s].to(dt) + res
        a[s] = res
    return linear


def linear_(tensors: list[torch.Tensor], weights: list[float], normalize: bool) -> None:
    """``tensors[0] <- sum_i w_i tensors[i]`` (divided by ``sum_i w_i`` when normalizing)."""
    first = tensors[0]
    dt = _work_dtype(first)
    w = torch.tensor(weights, dtype=dt)
    for s in _blocks(tuple(first.shape)):
        res = torch.zeros_like(first[s], dtype=dt)
        for x, c in zip(tensors, w.unbind(0)):
            res.addcmul_(x[s].to(dt), c)
        if normalize:
            res.div_(w.sum())
        first[s] = res


def task_(base: torch.Tensor, others: list[torch.Tensor], weights: list[float],
          normalize: bool, scale: float) -> None:
    """Task arithmetic: ``base <- base + scale * sum_i w_i (others[i] - base)`` (the sum
    divided by ``sum_i w_i`` when normalizing)."""
    dt = _work_dtype(base)
    w = torch.tensor(weights, dtype=dt)
    divisor = w.sum()
    if divisor.abs() < 1e-8:
        divisor = torch.ones((), dtype=dt)
    for s in _blocks(tuple(base.shape)):
        b = base[s].to(dt)
        deltas = torch.stack([o[s].to(dt) - b for o in others])
        deltas.mul_(w.reshape(-1, *([1] * b.dim())))
        mixed = deltas.sum(dim=0)
        if normalize:
            mixed /= divisor
        if scale != 1:
            mixed *= scale
        base[s] = b + mixed

"""CPU backend: the few adjustments that let megatron-core run on CPU with gloo.

megatron-core assumes CUDA in a handful of places. Everything needed to run its real
GPTModel, tensor-parallel layers, pipeline schedules, distributed checkpointing and optimizer
on CPU lives here, so that CI exercises the same TP/PP code that runs on GPUs:

1. ``torch.cuda.current_device()`` is used to place tensors: it answers ``0`` and the device
   mode below maps device ``0``/``"cuda"`` to the CPU.
2. The tensor-parallel RNG tracker saves and restores CUDA RNG states: those calls are routed
   to the CPU generator, which keeps the tracker's semantics (a separate model-parallel stream
   forked in and out).
3. Pipeline schedules and communication create tensors with a literal ``device="cuda"`` or
   call ``Tensor.cuda()``: a ``TorchFunctionMode`` rewrites any CUDA device to the CPU.
4. The optimizer asserts ``param.type() == 'torch.cuda.FloatTensor'``: CPU float tensors are
   reported with their CUDA type name while the backend is on, so the same optimizer code runs.

The backend is process-global and idempotent; it is installed only when no GPU is present.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_installed = False
_lock = threading.Lock()
_CPU = torch.device("cpu")


def _to_cpu_device(device: Any) -> Any:
    """Map any CUDA device spelling (``"cuda"``, ``"cuda:0"``, ``0``, a device) to the CPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA devices in torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func in (torch.Tensor.to,) and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


_mode = _CudaToCpuMode()
_orig_type = torch.Tensor.type


def _tensor_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    # Megatron's optimizer checks `param.type() == 'torch.cuda.FloatTensor'`.
    if not args and not kwargs and self.device.type == "cpu":
        name = _orig_type(self)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
    return _orig_type(self, *args, **kwargs)


def _install_rng() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    def get_rng_state(device: Any = "cuda", **_: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    torch.cuda.get_rng_state = get_rng_state  # type: ignore[assignment]
    torch.cuda.set_rng_state = set_rng_state  # type: ignore[assignment]
    def manual_seed(seed: int) -> None:
        # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, i.e. this function.
        torch.default_generator.manual_seed(int(seed))

    torch.cuda.manual_seed = manual_seed  # type: ignore[assignment]
    torch.cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
    torch.cuda.random.get_rng_state = get_rng_state  # type: ignore[assignment]
    tp_random._get_cuda_rng_state = get_rng_state
    tp_random._set_cuda_rng_state = set_rng_state


def install() -> None:
    """Install the CPU backend (idempotent). Call before building any Megatron model."""
    global _installed
    with _lock:
        if _installed:
            return
        if torch.cuda.is_available():
            raise RuntimeError("the CPU backend must not be installed on a machine with a GPU")
        torch.cuda.current_device = lambda: 0  # type: ignore[assignment]
        torch.cuda.set_device = lambda *_a, **_k: None  # type: ignore[assignment]
        torch.cuda.synchronize = lambda *_a, **_k: None  # type: ignore[assignment]
        torch.cuda.device_count = lambda: 0  # type: ignore[assignment]
        torch.Tensor.type = _tensor_type  # type: ignore[method-assign]
        _install_rng()
        _mode.__enter__()
        _installed = True


def installed() -> bool:
    """Whether the CPU backend is active in this process."""
    return _installed

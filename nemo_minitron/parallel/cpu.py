"""CPU backend: the few adjustments that let megatron-core run on CPU with gloo.

megatron-core assumes CUDA in a handful of places. Everything needed to run its real
GPTModel, tensor-parallel layers, pipeline schedules, distributed checkpointing and optimizer
on CPU lives here, so that CI exercises the same TP/PP code that runs on GPUs:

1. ``torch.cuda.current_device()`` is used to place tensors: it answers ``0`` and the device
   mode below maps device ``0``/``"cuda"`` to the CPU (``set_device``, ``synchronize`` do
   nothing, ``device_count`` answers 0).
2. The tensor-parallel RNG tracker saves and restores CUDA RNG states: those calls are routed
   to the CPU generator, which keeps the tracker's semantics (a separate model-parallel stream
   forked in and out).
3. Pipeline schedules and communication create tensors with a literal ``device="cuda"`` or
   call ``Tensor.cuda()``: a ``TorchFunctionMode`` rewrites any CUDA device to the CPU, in
   autograd's backward functions too (``_in_mode``: Megatron's sequence-parallel linears and
   MoE dispatchers allocate on ``torch.cuda.current_device()`` there).
4. The optimizer asserts ``param.type() == 'torch.cuda.FloatTensor'``: CPU float tensors are
   reported with their CUDA type name while the backend is on, so the same optimizer code runs.

Scope: ``parallel.runtime.init_distributed`` enters the backend (only when no GPU is present)
and ``parallel.runtime.shutdown`` leaves it, restoring every patched function; ``backend()``
is the same as a ``with`` block. While it is on, the whole process is affected, user code in
the same process included: ``torch.cuda.*`` above answer as described, a CPU float tensor's
``.type()`` reads ``torch.cuda.FloatTensor``, and ``device="cuda"`` / ``.cuda()`` / ``.to("cuda")``
silently give CPU tensors (on the thread that entered it: torch function modes are
per-thread). Every torch call pays the mode's dispatch cost (``benchmarks/cpu_backend.py``
measures it). Modes entered by user code while the backend is on must be left before
``shutdown``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_CPU = torch.device("cpu")
_saved: list[tuple[Any, str, Any]] = []  # (owner, attribute, original), in patch order
_INHERITED = object()  # the attribute came from a base class: delete ours on exit
_mode: TorchFunctionMode | None = None


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


def _cuda_type_name(orig: Any) -> Any:
    def tensor_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # Megatron's optimizer checks `param.type() == 'torch.cuda.FloatTensor'`.
        if not args and not kwargs and self.device.type == "cpu":
            name = orig(self)
            return name if name.startswith("torch.cuda.") \
                else name.replace("torch.", "torch.cuda.", 1)
        return orig(self, *args, **kwargs)
    return tensor_type


def _in_mode(run_backward: Any) -> Any:
    """Autograd's engine entry run with the device mode on. ``backward()`` and
    ``autograd.grad`` are torch functions, so they run inside the mode's handler, where a mode
    is off; the engine would then run every backward function without it (Megatron's
    tensor-parallel linears allocate on the CUDA device in their backward: sequence
    parallelism, expert parallelism)."""
    def engine(*args: Any, **kwargs: Any) -> Any:
        mode = _mode
        if mode is None or torch.overrides._get_current_function_mode() is mode:
            return run_backward(*args, **kwargs)
        with mode:
            return run_backward(*args, **kwargs)
    return engine


def _patch(owner: Any, name: str, value: Any) -> None:
    _saved.append((owner, name, vars(owner).get(name, _INHERITED)))
    setattr(owner, name, value)


def _cpu_rng_functions() -> dict[str, Any]:
    def get_rng_state(device: Any = "cuda", **_: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    def manual_seed(seed: int) -> None:
        # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, i.e. this function.
        torch.default_generator.manual_seed(int(seed))

    return {"get": get_rng_state, "set": set_rng_state, "seed": manual_seed}


def enter(rewrite_devices: bool = True) -> None:
    """Turn the backend on (idempotent). ``rewrite_devices=False`` leaves out the device mode
    (adjustment 3), for code that never names a CUDA device (measured by the benchmark)."""
    global _mode
    with _lock:
        if _saved or _mode is not None:
            return
        if torch.cuda.is_available():
            raise RuntimeError("the CPU backend must not be used on a machine with a GPU")
        from megatron.core.tensor_parallel import random as tp_random

        _patch(torch.cuda, "current_device", lambda: 0)
        _patch(torch.cuda, "set_device", lambda *_a, **_k: None)
        _patch(torch.cuda, "synchronize", lambda *_a, **_k: None)
        _patch(torch.cuda, "device_count", lambda: 0)
        rng = _cpu_rng_functions()
        _patch(torch.cuda, "get_rng_state", rng["get"])
        _patch(torch.cuda, "set_rng_state", rng["set"])
        _patch(torch.cuda, "manual_seed", rng["seed"])
        _patch(torch.cuda, "manual_seed_all", lambda seed: None)
        _patch(torch.cuda.random, "get_rng_state", rng["get"])
        _patch(tp_random, "_get_cuda_rng_state", rng["get"])
        _patch(tp_random, "_set_cuda_rng_state", rng["set"])
        _patch(torch.Tensor, "type", _cuda_type_name(torch.Tensor.type))
        if rewrite_devices:
            _mode = _CudaToCpuMode()
            _mode.__enter__()
            if hasattr(torch.autograd, "_engine_run_backward"):  # torch >= 2.4
                _patch(torch.autograd, "_engine_run_backward",
                       _in_mode(torch.autograd._engine_run_backward))


def exit() -> None:  # noqa: A001 - the pair of enter()
    """Turn the backend off: leave the device mode, restore every patched function."""
    global _mode
    with _lock:
        if _mode is not None:
            _mode.__exit__(None, None, None)
            _mode = None
        while _saved:
            owner, name, original = _saved.pop()
            if original is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def active() -> bool:
    """Whether the CPU backend is on in this process."""
    return bool(_saved)


@contextlib.contextmanager
def device_rewrites_paused() -> Iterator[None]:
    """The device mode (adjustment 3) left for the ``with`` block, where it is this thread's
    innermost torch function mode; nothing changes otherwise. For a hot loop known to name no
    CUDA device (a one-rank KV-cache decode step), which so skips the mode's cost on each of its
    few thousand torch calls; a CUDA device named inside fails loudly ("Cannot access
    accelerator device"), it is never silently misplaced."""
    mode = _mode
    if mode is None or torch.overrides._get_current_function_mode() is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


@contextlib.contextmanager
def backend(rewrite_devices: bool = True) -> Iterator[None]:
    """The CPU backend on for the ``with`` block (off after it, unless it was on before)."""
    was_on = active()
    enter(rewrite_devices)
    try:
        yield
    finally:
        if not was_on:
            exit()

"""Each adjustment of the CPU backend, pausing its device mode, and that leaving it restores
torch exactly (run in the pytest process: the backend starts no process group)."""

from __future__ import annotations

import pytest
import torch

from nemo_minitron.parallel import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU backend: no GPU only")

PATCHED = [(torch.cuda, "current_device"), (torch.cuda, "set_device"),
           (torch.autograd, "_engine_run_backward"),
           (torch.cuda, "synchronize"), (torch.cuda, "device_count"),
           (torch.cuda, "get_rng_state"), (torch.cuda, "set_rng_state"),
           (torch.cuda, "manual_seed"), (torch.cuda, "manual_seed_all"),
           (torch.cuda.random, "get_rng_state")]


def test_current_device_answers_zero_and_lands_on_cpu():
    with pytest.raises((RuntimeError, AssertionError)):
        torch.cuda.current_device()  # no CUDA: torch itself refuses
    with cpu.backend():
        assert torch.cuda.current_device() == 0 and torch.cuda.device_count() == 0
        torch.cuda.set_device(0)
        torch.cuda.synchronize()
        assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.cuda.current_device()


def test_megatron_rng_tracker_forks_a_cpu_stream():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    try:
        with cpu.backend():
            torch.manual_seed(1)
            tracker.add("model-parallel", 123)
            outside_before = torch.rand(2)
            with tracker.fork("model-parallel"):
                forked = torch.rand(4)
            outside_after = torch.rand(2)
    finally:
        tracker.reset()
    # The forked stream is the CPU generator seeded 123; the default stream is untouched by it.
    torch.testing.assert_close(forked, torch.rand(4, generator=torch.Generator().manual_seed(123)))
    g = torch.Generator().manual_seed(1)
    torch.testing.assert_close(torch.cat([outside_before, outside_after]),
                               torch.rand(4, generator=g))


def test_device_mode_rewrites_cuda_devices():
    x = torch.ones(2)
    with cpu.backend():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
        assert x.cuda() is x
        assert x.to("cuda:0").device.type == "cpu"
        assert x.to(device="cuda").device.type == "cpu"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(2, device="cuda")


class _AllocatesInBackward(torch.autograd.Function):
    """Like Megatron's tensor-parallel linears under sequence parallelism: a backward that
    allocates on ``torch.cuda.current_device()``."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        buffer = torch.empty(grad.shape, device=torch.cuda.current_device())
        return buffer.copy_(grad) * 2


@pytest.mark.parametrize("how", ["Tensor.backward", "autograd.backward", "autograd.grad"])
def test_backward_functions_run_with_the_device_mode(how):
    x = torch.ones(3, requires_grad=True)
    with cpu.backend():
        y = _AllocatesInBackward.apply(x).sum()
        if how == "Tensor.backward":
            y.backward()
        elif how == "autograd.backward":
            torch.autograd.backward([y])
        else:
            x.grad = torch.autograd.grad(y, x)[0]
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    y = _AllocatesInBackward.apply(x).sum()
    with pytest.raises((RuntimeError, AssertionError)):
        y.backward()  # the backend off: the CUDA device is refused again


def test_tensor_type_reports_the_cuda_name():
    x = torch.zeros(2)
    assert x.type() == "torch.FloatTensor"
    with cpu.backend():
        assert x.type() == "torch.cuda.FloatTensor"
        assert torch.zeros(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert x.type(torch.float64).dtype == torch.float64  # conversions still convert
    assert x.type() == "torch.FloatTensor"


def test_leaving_restores_every_function_and_nesting_keeps_it_on():
    before = {(id(o), n): getattr(o, n) for o, n in PATCHED}
    had_type = "type" in vars(torch.Tensor)
    with cpu.backend():
        assert cpu.active()
        with cpu.backend():  # an inner block does not switch off the outer one
            pass
        assert cpu.active() and torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert not cpu.active()
    assert {(id(o), n): getattr(o, n) for o, n in PATCHED} == before
    assert ("type" in vars(torch.Tensor)) == had_type
    from megatron.core.tensor_parallel import random as tp_random

    assert tp_random._get_cuda_rng_state is not torch.get_rng_state


def test_without_device_rewriting_only_the_mode_is_left_out():
    with cpu.backend(rewrite_devices=False):
        assert torch.cuda.current_device() == 0
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(2, device="cuda")


def test_device_rewrites_pause_only_where_the_mode_is_innermost():
    from torch.overrides import TorchFunctionMode, _get_current_function_mode

    with cpu.device_rewrites_paused():  # backend off: nothing to pause
        pass
    with cpu.backend():
        mode = _get_current_function_mode()
        with cpu.device_rewrites_paused():
            assert _get_current_function_mode() is not mode
            with pytest.raises((RuntimeError, AssertionError)):  # loud, never misplaced
                torch.zeros(2, device="cuda")
            assert torch.cuda.current_device() == 0  # the patched functions stay
        assert _get_current_function_mode() is mode
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        with pytest.raises(ValueError), cpu.device_rewrites_paused():
            raise ValueError  # restored on the way out of an error too
        assert _get_current_function_mode() is mode

        class Outer(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        with Outer() as outer, cpu.device_rewrites_paused():
            # Another mode is innermost: popping ours from under it would corrupt the stack.
            assert _get_current_function_mode() is outer
            assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert _get_current_function_mode() is mode

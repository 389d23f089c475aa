"""The local spec's linear layers: Megatron's, with a direct product when nothing needs autograd.

megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` route every forward through
``LinearWithGradAccumulationAndAsyncCommunication`` (an autograd ``Function`` under
``torch.amp.custom_fwd``) and the tensor-parallel mapping functions, also under ``no_grad``
where none of it has work to do on one rank: measured at about 65 us per call on CPU, four
calls per layer and decode step, a constant that width pruning does not shrink. With gradients
off and a tensor-parallel group of one rank, ``forward`` here computes what those functions
compute, ``torch.matmul(input, weight.t())`` plus the bias, directly (Megatron's own
``inference_optimized`` linear layers do the same); every other case is Megatron's
``forward``. Same parameters and sharded state dict, so checkpoints are the same; outputs are
bit-identical (``tests/model/test_linear.py``)."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


def _direct(layer: ColumnParallelLinear | RowParallelLinear) -> bool:
    """Whether ``layer``'s forward is only a matrix product and a bias: no gradients to record,
    one tensor-parallel rank (every mapping is the identity), no deferred weight-gradient buffer
    and no CPU offloading to feed."""
    c = layer.config
    return (not torch.is_grad_enabled() and layer.tp_group.size() == 1
            and not c.defer_embedding_wgrad_compute and c._cpu_offloading_context is None)


class InferenceColumnParallelLinear(ColumnParallelLinear):
    """Megatron's ``ColumnParallelLinear``, a direct product when ``_direct``."""

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None):
        """As ``ColumnParallelLinear.forward``: ``(output, bias or None)``."""
        if weight is not None or not _direct(self):
            return super().forward(input_, weight, runtime_gather_output=runtime_gather_output)
        out = torch.matmul(input_, self.weight.t())
        if self.skip_bias_add:
            return out, self.bias
        return (out + self.bias if self.bias is not None else out), None


class InferenceRowParallelLinear(RowParallelLinear):
    """Megatron's ``RowParallelLinear``, a direct product when ``_direct``."""

    def forward(self, input_: torch.Tensor):
        """As ``RowParallelLinear.forward``: ``(output, bias or None)``."""
        if self.explicit_expert_comm or not _direct(self):
            return super().forward(input_)
        out = torch.matmul(input_, self.weight.t())
        if self.skip_bias_add:
            return out, self.bias
        return (out + self.bias if self.bias is not None else out), None

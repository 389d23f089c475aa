"""``GPTModel`` that computes logits batch-first when it returns them without autograd.

megatron-core's ``GPTModel`` computes logits sequence-first, ``[s, b, v]``, and when it returns
them (no ``labels``) copies them to ``[b, s, v]`` (``transpose(0, 1).contiguous()``): a pass
over the largest activation of the model. Measured on CPU, 5% of a demo-shape forward. Here,
in a forward without autograd (a KD teacher, evaluation, ``forward_logits``), the output layer
is fed the hidden states batch-first (a copy of ``[b, s, h]``, ``v / h`` times smaller) and its
``[b, s, v]`` output is handed back as an ``[s, b, v]`` view; Megatron's transpose then finds
it contiguous and copies nothing. Each logit is the same dot product; same parameters and
checkpoints.

Megatron's own path is kept under autograd (a training step keeps Megatron's order of the
output layer's weight-gradient sums, so its numerics are Megatron's), when labels are given
(its loss reads ``[s, b, v]``), with an inference context (it selects last-token hidden
states), under sequence parallelism (the output layer gathers along the sequence dimension),
with multi-token prediction, and on stages without the output layer.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.gpt import GPTModel


def _batch_first_input(module: torch.nn.Module, args: tuple) -> tuple | None:
    if not getattr(module, "batch_first", False):
        return None
    hidden, *rest = args
    # Contiguous: the matmul reads [b * s, h] as one matrix (it would copy a strided view).
    return (hidden.transpose(0, 1).contiguous(), *rest)


def _sequence_first_view(module: torch.nn.Module, args: tuple, output: Any) -> Any:
    if not getattr(module, "batch_first", False):
        return None
    logits, bias = output
    return logits.transpose(0, 1), bias


class MinitronGPTModel(GPTModel):
    """Megatron's ``GPTModel``; returned logits are computed batch-first (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.post_process:
            self.output_layer.register_forward_pre_hook(_batch_first_input)
            self.output_layer.register_forward_hook(_sequence_first_view)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                inference_context=None, *args: Any, **kwargs: Any):
        """``GPTModel.forward``."""
        call = (input_ids, position_ids, attention_mask, decoder_input, labels,
                inference_context, *args)
        if not (self.post_process and labels is None and inference_context is None
                and not torch.is_grad_enabled()
                and kwargs.get("inference_params") is None
                and not self.config.sequence_parallel
                and not getattr(self, "mtp_process", False)):
            return super().forward(*call, **kwargs)
        self.output_layer.batch_first = True
        try:
            return super().forward(*call, **kwargs)
        finally:
            self.output_layer.batch_first = False

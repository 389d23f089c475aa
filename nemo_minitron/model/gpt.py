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

A training step that needs the logits themselves (distillation) passes ``logits_loss``: the last
stage then returns ``logits_loss(labels [b, s], logits [s, b, v])`` in place of Megatron's
cross-entropy, on the logits as the output layer wrote them. Neither the logits nor their
gradient is transposed (two copies of the largest activation per micro-batch, 10% of a
demo-shape distillation step on CPU), and the numerics are Megatron's.

A decode step against a filled static KV cache on one tensor-parallel rank names no CUDA device
anywhere in Megatron's code, so on the CPU backend it runs with the device mode paused
(``parallel.cpu.device_rewrites_paused``): measured about 10% of a SmolLM2-135M decode step.
Not for an MoE model: megatron-core's MoE layer names a CUDA device in such a step.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """Megatron's ``GPTModel``; returned logits are computed batch-first, and a loss can be
    given the sequence-first logits (module docstring)."""

    def __init__(self, config: Any, transformer_layer_spec: Any, *args: Any,
                 **kwargs: Any) -> None:
        from megatron.core.utils import get_pg_rank

        from nemo_minitron.model.norm import block_spec

        # The final norm of a torch-norm spec, also under sequence parallelism (model/norm.py);
        # the layer spec itself is kept, so a rebuild with fewer layers builds fewer. The stage's
        # layer count as megatron-core's TransformerBlock computes it (its pipeline group).
        pg = kwargs.get("pg_collection")
        pp_rank = get_pg_rank(pg.pp) if pg is not None and hasattr(pg, "pp") else None
        super().__init__(config, block_spec(transformer_layer_spec, config,
                                            kwargs.get("vp_stage"), pp_rank), *args, **kwargs)
        self.transformer_layer_spec = transformer_layer_spec
        self._logits_loss: Callable[[torch.Tensor, torch.Tensor], Any] | None = None
        if self.post_process:
            self.output_layer.register_forward_pre_hook(_batch_first_input)
            self.output_layer.register_forward_hook(_sequence_first_view)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                inference_context=None, *args: Any,
                logits_loss: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
                **kwargs: Any):
        """``GPTModel.forward``; with ``logits_loss`` and ``labels`` the last stage returns
        ``logits_loss(labels [b, s], logits [s, b, v/TP])`` instead of the cross-entropy."""
        call = (input_ids, position_ids, attention_mask, decoder_input, labels,
                inference_context, *args)
        if logits_loss is not None:
            if labels is None or getattr(self, "mtp_process", False):
                raise ValueError("logits_loss needs labels and a model without multi-token "
                                 "prediction")
            self._logits_loss = logits_loss
            try:
                return super().forward(*call, **kwargs)
            finally:
                self._logits_loss = None
        if self._cached_one_rank_step(inference_context):
            from nemo_minitron.parallel.cpu import device_rewrites_paused

            with device_rewrites_paused():
                return super().forward(*call, **kwargs)
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

    def _cached_one_rank_step(self, ctx: Any) -> bool:
        """A forward without autograd on one tensor-parallel rank against a static KV cache that
        every layer of this stage has already allocated (a decode or verification step)."""
        if ctx is None or torch.is_grad_enabled() or not ctx.is_static_batching():
            return False
        if self.config.num_moe_experts:  # megatron-core's MoE layer names a CUDA device
            return False
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.attention import Attention

        memory = ctx.key_value_memory_dict
        # A heterogeneous layer whose attention is no-op or linear keeps no cache.
        return (ps.get_tensor_model_parallel_world_size() == 1
                and all(layer.layer_number in memory for layer in self.decoder.layers
                        if isinstance(layer.self_attention, Attention)))

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> Any:
        """Megatron's cross-entropy, or the ``logits_loss`` of the current forward."""
        if self._logits_loss is not None:
            return self._logits_loss(labels, logits)
        return super().compute_language_model_loss(labels, logits)

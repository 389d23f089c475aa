"""Training objectives: what one micro-batch's forward computes and how its loss reduces.

The training loop is objective-agnostic: it hands Megatron's pipeline schedule
``objective.forward_step``. Pretraining and fine-tuning use ``LMObjective``; distillation plugs
in its own objective (teacher + student) through the same interface.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch

from nemo_minitron.data.instruct import sft_attention_mask

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Objective:
    """Everything the training loop asks of an objective. Subclasses implement
    ``forward_step`` and set ``metric_names``; the other methods have defaults that fit an
    objective whose pipeline stages exchange only the model's hidden state and whose losses
    all come from the last stage."""

    metric_names: list[str]
    """Names of the metrics ``loss_func`` reports (the first is the optimised loss)."""

    def forward_step(self, data_iterator: Iterator[dict[str, torch.Tensor]],
                     model: torch.nn.Module) -> tuple[torch.Tensor, LossFunc]:
        """One micro-batch: ``(output, loss_func)``, the contract of
        ``megatron.core.pipeline_parallel.get_forward_backward_func``. ``loss_func`` runs on
        the last pipeline stage and returns ``(loss, {name: detached value})``."""
        raise NotImplementedError

    def adjust_tensor_shapes(self, recv: list, send: list) -> tuple[list, list]:
        """Shapes of the tensors pipeline stages receive and send (PP > 1): unchanged by
        default; an objective that sends more than the hidden state (distillation) grows
        them."""
        return recv, send

    def pop_stage_metrics(self) -> dict[str, float]:
        """Metrics of losses computed on this (non-last) stage since the last call, as means
        over micro-batches; the loop adds them to the last stage's. None by default."""
        return {}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a micro-batch to the model's device."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean of a [b, s] per-token loss over unmasked tokens (fp32)."""
    mask = loss_mask.float()
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


class LMObjective(Objective):
    """Next-token cross-entropy (vocab-parallel, computed inside ``GPTModel``)."""

    name = "lm loss"
    metric_names = ["lm loss"]

    def __init__(self, device: torch.device):
        self.device = device

    def forward_step(self, data_iterator, model):
        batch = to_device(next(data_iterator), self.device)
        # With labels, the last stage returns the per-token loss [b, s]; other stages return
        # their hidden states for the next stage.
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(self._loss, batch["loss_mask"])

    def _loss(self, loss_mask: torch.Tensor, per_token: torch.Tensor):
        loss = masked_mean(per_token, loss_mask)
        # clone: the schedule divides the returned loss in place by the micro-batch count
        return loss, {self.name: loss.detach().clone()}


class SFTObjective(LMObjective):
    """Supervised fine-tuning: the LM loss on response tokens only (the instruction data's
    ``loss_mask``). Packed windows carry ``segment_ids``, from which a block-diagonal causal
    attention mask keeps every example to itself."""

    name = "sft loss"
    metric_names = ["sft loss"]

    def forward_step(self, data_iterator, model):
        batch = to_device(next(data_iterator), self.device)
        seg = batch.get("segment_ids")
        mask = sft_attention_mask(seg) if seg is not None else None
        output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
        return output, partial(self._loss, batch["loss_mask"])

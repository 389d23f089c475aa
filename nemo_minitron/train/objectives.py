"""Training objectives: what one micro-batch's forward computes and how its loss reduces.

The training loop is objective-agnostic: it hands Megatron's pipeline schedule
``objective.forward_step``. Pretraining and fine-tuning use ``LMObjective``; distillation plugs
in its own objective (teacher + student) through the same interface.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Protocol

import torch

from nemo_minitron.data.instruct import sft_attention_mask

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Objective(Protocol):
    """One micro-batch: ``forward_step(data_iterator, model) -> (output, loss_func)``, the
    contract of ``megatron.core.pipeline_parallel.get_forward_backward_func``. ``loss_func``
    runs on the last pipeline stage and returns ``(loss, {name: detached value})``."""

    def forward_step(self, data_iterator: Iterator[dict[str, torch.Tensor]],
                     model: torch.nn.Module) -> tuple[torch.Tensor, LossFunc]: ...

    metric_names: list[str]
    """Names of the metrics ``loss_func`` reports (the first is the optimised loss)."""

    def trainable_modules(self) -> list[torch.nn.Module]:
        """Extra modules trained beside the model (e.g. distillation projections)."""
        ...


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a micro-batch to the model's device."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean of a [b, s] per-token loss over unmasked tokens (fp32)."""
    mask = loss_mask.float()
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


class LMObjective:
    """Next-token cross-entropy (vocab-parallel, computed inside ``GPTModel``)."""

    name = "lm loss"
    metric_names = ["lm loss"]

    def __init__(self, device: torch.device):
        self.device = device

    def trainable_modules(self) -> list[torch.nn.Module]:
        return []

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

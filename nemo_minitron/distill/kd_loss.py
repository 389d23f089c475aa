"""Knowledge distillation inside a user's own Megatron-core training loop.

``KDLoss(student, teacher, KDConfig(...))`` is the ``distill`` verb's objective
(``KDObjective``: the same vocab-parallel, chunked logit losses, intermediate losses and
pipeline plumbing) with a constructor for in-memory models, so a script that owns its data
iterator, optimizer and ``get_forward_backward_func()`` call uses it as its
``forward_step_func`` (``kd.forward_step``) or calls it on a micro-batch from inside its own
(``kd(batch, model)`` -> ``(output, loss_func)``).
"""

from __future__ import annotations

import torch

from nemo_minitron.config import ConfigError
from nemo_minitron.distill.objective import KDConfig, KDObjective, add_projections
from nemo_minitron.distill.stage import layer_pairs
from nemo_minitron.model.build import unwrap
from nemo_minitron.train.objectives import LossFunc, to_device


class KDLoss(KDObjective):
    """The distillation loss of ``student`` against the frozen ``teacher`` (this rank's stages
    of the same TP/PP layout, built under the current parallel state) for Megatron's schedules.

    ``cfg`` (default ``KDConfig()``: forward KL on the logits) is the ``distill`` verb's ``kd:``
    section, ``teacher_cache`` excepted. ``num_microbatches``: micro-batches per
    ``get_forward_backward_func()`` call; under PP it scales intermediate losses computed on
    earlier stages. ``seed`` initialises the learned projections that intermediate losses
    need when the hidden sizes differ: they are attached to the student
    (``student.kd_projections``), so build ``KDLoss`` before the student's optimizer.

    The teacher is put in eval mode with gradients off. Each micro-batch is a dict of ``[b, s]``
    tensors ``tokens``, ``position_ids``, ``labels``, ``loss_mask``. ``loss_func`` returns
    ``(loss, {"loss", "kd loss", "lm loss", ...: detached values})``, which
    ``get_forward_backward_func()`` collects per micro-batch on the last pipeline stage. Under
    PP pass ``adjust_tensor_shapes_fn=kd.adjust_tensor_shapes`` to the schedule (stages send
    the student's and the teacher's hidden states side by side).
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module,
                 cfg: KDConfig | None = None, *, num_microbatches: int = 1, seed: int = 0):
        cfg = KDConfig() if cfg is None else cfg
        if cfg.teacher_cache is not None:
            raise ConfigError("KDLoss runs the teacher live: kd.teacher_cache is for the "
                              "distill verb; pass teacher_cache=None")
        if cfg.on_policy.fraction > 0:  # its prompts and samples need the verb's data
            raise ConfigError("KDLoss distills on your batches: kd.on_policy is for the distill "
                              "verb and distill_models; pass kd.on_policy.fraction=0")
        if num_microbatches < 1:
            raise ConfigError(f"KDLoss: num_microbatches={num_microbatches} must be >= 1")
        s, t = unwrap(student), unwrap(teacher)
        # The verb's defaults (``distill_models``): the user's layer map, else evenly spaced.
        pairs = layer_pairs(None, s.config.num_layers, t.config.num_layers, cfg.layer_map)
        add_projections(s, t.config.hidden_size, pairs if cfg.hidden_weight else [],
                        cfg.embedding_weight > 0, seed)
        super().__init__(t, s, cfg, next(s.parameters()).device, pairs=pairs,
                         num_microbatches=num_microbatches)

    def __call__(self, batch: dict[str, torch.Tensor],
                 model: torch.nn.Module) -> tuple[torch.Tensor, LossFunc]:
        """``(output, loss_func)`` of one micro-batch, for a user's ``forward_step_func``:
        ``model`` is the one the schedule passed it (the student, wrapped or not)."""
        return self.step(to_device(batch, self.device), model)

"""nemo_minitron: structured pruning and knowledge distillation of Megatron-core GPT models.

The library API (``docs/library.md``) for a user's own Megatron-core or NeMo script::

    import nemo_minitron as nm

    scores = nm.estimate_importance(model, forward_loop)    # or batches of tokens
    cfg = nm.ModelConfig.from_transformer_config(model.config, vocab_size=V, seq_length=S)
    plan = nm.make_plan(cfg, scores, nm.Target(hidden_size=3072, ffn_hidden_size=9216))
    pruned = nm.prune(model, plan)
    merged = nm.merge([model_a, model_b], method="slerp", t=0.5)
    kd = nm.KDLoss(student, teacher, nm.KDConfig())      # kd.forward_step: a forward_step_func

Importing the package changes nothing in the process (no warning filters, logging handlers or
CPU backend; the command line sets its own up in ``cli.main``) and imports neither torch nor
megatron-core: each name below imports its module on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "nemo_minitron.config:ConfigError",
    "ModelConfig": "nemo_minitron.config:ModelConfig",
    "ImportanceEstimator": "nemo_minitron.importance.estimator:ImportanceEstimator",
    "estimate_importance": "nemo_minitron.importance.estimator:estimate_importance",
    "Scores": "nemo_minitron.importance.scores:Scores",
    "Target": "nemo_minitron.prune.plan:Target",
    "PrunePlan": "nemo_minitron.prune.plan:PrunePlan",
    "make_plan": "nemo_minitron.prune.plan:make_plan",
    "prune": "nemo_minitron.prune",  # callable: prune.apply.prune_model
    "merge": "nemo_minitron.merge",  # callable: merge.memory.merge
    "KDConfig": "nemo_minitron.distill.objective:KDConfig",
    "KDLoss": "nemo_minitron.distill.kd_loss:KDLoss",
    "load_weights": "nemo_minitron.checkpoint.io:load_weights",
    "cpu_backend": "nemo_minitron.parallel.cpu:backend",
}
"""Public name -> ``module:attribute`` (or a module, for the callable packages)."""

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> object:  # PEP 562: imported on first use
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nemo_minitron' has no attribute {name!r}")
    module, _, attr = _EXPORTS[name].partition(":")
    value = importlib.import_module(module)
    value = getattr(value, attr) if attr else value
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

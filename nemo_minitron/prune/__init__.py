"""Structured pruning: ``plan`` (target + scores -> kept units and the pruned config),
``apply`` (weight slicing into a newly built model), ``stage`` (the prune verb).

The package is callable: ``nemo_minitron.prune(model, plan)`` is ``apply.prune_model``.
"""

from nemo_minitron.utils.callable_package import make_callable

make_callable(__name__, "nemo_minitron.prune.apply:prune_model")

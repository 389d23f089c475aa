"""Model merging (SLERP, linear, task arithmetic) of checkpoints of one shape, streamed tensor
by tensor from and into distributed checkpoints, with mergekit's conventions.

The package is callable: ``nemo_minitron.merge(models_or_state_dicts, method=..., t=...)``
merges in memory (``memory.merge``) with the same per-tensor arithmetic.
"""

from nemo_minitron.utils.callable_package import make_callable

make_callable(__name__, "nemo_minitron.merge.memory:merge")

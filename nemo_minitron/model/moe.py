"""Mixture-of-experts models on megatron-core's MoE layer: its one compatibility shim, and the
router losses its tracker recorded during a step.

The shim: megatron-core 0.16.1 imports ``te_general_gemm`` in ``moe_utils`` only when
Transformer Engine imports, yet ``RouterGatingLinearFunction`` reads the name unconditionally
(``if te_general_gemm is not None``), so without TE every router raises ``NameError``.
``ensure_router_gemm`` defines it as None, the value the module tests for, when an MoE model is
built (never at import of this package). ``tests/model/test_moe.py`` fails once megatron-core
defines the name itself: then this shim can go.
"""

from __future__ import annotations

from typing import Any


def ensure_router_gemm() -> None:
    """Define ``moe_utils.te_general_gemm = None`` where megatron-core 0.16.1 left it undefined
    (no Transformer Engine); see the module docstring."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def router_loss_metrics(num_layers: int, num_microbatches: int) -> dict[str, float]:
    """The router losses megatron-core's tracker summed over this step's micro-batches
    (``load_balancing_loss``, ``z_loss``; unweighted: their coefficients scale only what their
    gradients add to the objective's), as Megatron-LM's training logs them: reduced across
    PP/DP (every rank calls this), mean over MoE layers and micro-batches. Clears the tracker;
    empty when no router loss ran."""
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    moe_utils.reduce_aux_losses_tracker_across_ranks()
    _mean_over_tensor_parallel(tracker)
    _mean_over_data_parallel(tracker)
    out = {name: float(v["values"].double().sum()) / (num_layers * num_microbatches)
           for name, v in sorted(tracker.items())}
    moe_utils.clear_aux_losses_tracker()
    return out


def _mean_over_tensor_parallel(tracker: dict[str, Any]) -> None:
    """A loss without a ``reduce_group`` (the z-loss) is tracked per rank as the mean over its
    own tokens; under sequence parallelism each tensor-(and context-)parallel rank holds other
    tokens: the mean over that group is the mean over all of them (equal shards)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_and_context_parallel_group()
    size = dist.get_world_size(group)
    for entry in tracker.values():
        if size > 1 and entry.get("reduce_group") is None:
            dist.all_reduce(entry["values"], group=group)
            entry["values"] /= size


def _mean_over_data_parallel(tracker: dict[str, Any]) -> None:
    """Megatron averages a tracked loss over data-parallel ranks only when it has a
    ``reduce_group`` (the load-balancing loss); the others (the z-loss) stay each rank's own,
    i.e. of its share of the batch: average those too (a sum and a division: gloo has no AVG)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group(with_context_parallel=False, partial_data_parallel=False)
    size = dist.get_world_size(group)
    for entry in tracker.values():
        if size > 1 and entry.get("reduce_group") is None:
            dist.all_reduce(entry["values"], group=group)
            entry["values"] /= size


def moe_layer_spec(cfg: Any, use_te: bool) -> Any:
    """Megatron's own layer spec with an MoE MLP (per-expert MLPs, no grouped GEMM)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    ensure_router_gemm()
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=cfg.num_moe_experts, moe_grouped_gemm=False,
            qk_layernorm=cfg.qk_layernorm)
    return specs.get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts,
                                          moe_grouped_gemm=False, qk_layernorm=cfg.qk_layernorm,
                                          normalization=cfg.normalization)

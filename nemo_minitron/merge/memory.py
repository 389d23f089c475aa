"""Merging in memory: models or full state dicts in, a merged full state dict out.

The same per-tensor arithmetic as the ``merge`` verb (``run.TensorMerger``: each logical tensor,
q/k/v and gate/up, on its own, mergekit's parameter rules and formulas), on tensors already in
memory: a model is gathered to its full TP=1/PP=1 state dict first (``model.full_state``; a
collective under TP/PP, every rank gets the whole result). Memory: every input's full state
dict plus the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.merge.config import MergeConfig
from nemo_minitron.merge.run import TensorMerger
from nemo_minitron.utils.logging import get_logger

log = get_logger("merge")

Input = Mapping[str, Any] | torch.nn.Module


def _model_config(inputs: Sequence[Input], config: Any) -> ModelConfig:
    """The ``ModelConfig`` that names the logical tensors (heads, query groups)."""
    if isinstance(config, ModelConfig):
        return config
    if config is None:
        model = next((x for x in inputs if isinstance(x, torch.nn.Module)), None)
        if model is None:
            raise ConfigError("merge: config= is needed when every input is a state dict "
                              "(its heads and query groups split linear_qkv into q, k, v)")
        from nemo_minitron.model.build import unwrap

        config = unwrap(model).config
    from nemo_minitron.model.build import model_config

    return model_config(config)


def _full_state(x: Input, field: str) -> Mapping[str, Any]:
    if isinstance(x, torch.nn.Module):
        from nemo_minitron.model.build import unwrap
        from nemo_minitron.model.full_state import gather_full_state_dict

        return gather_full_state_dict(unwrap(x))
    if not isinstance(x, Mapping):
        raise ConfigError(f"merge: {field} is a {type(x).__name__}, not a model or a state dict")
    return x


def merge_models(inputs: Sequence[Input], cfg: MergeConfig,
                 config: ModelConfig | Any | None = None) -> dict[str, Any]:
    """Merge ``inputs`` (models, or full TP=1/PP=1 state dicts of one shape; the base first:
    slerp's t=0 end, task arithmetic's common base) as ``cfg`` says; returns a new full state
    dict (inputs untouched; non-tensor entries such as ``_extra_state`` are the base's).
    ``config``: a ``ModelConfig`` or megatron-core ``TransformerConfig``, needed only when
    every input is a state dict (default: the first model's)."""
    if isinstance(inputs, Mapping | torch.nn.Module) or len(inputs) < 2:
        raise ConfigError("merge: give a list of at least two models or state dicts, the "
                          "base first")
    cfg.check_inputs(len(inputs) - 1)
    model_cfg = _model_config(inputs, config)
    names = ["the base", *(f"input {i}" for i in range(1, len(inputs)))]
    sds = [_full_state(x, f) for x, f in zip(inputs, names)]
    for sd, field in zip(sds[1:], names[1:]):
        for key in list(sds[0]) + [k for k in sd if k not in sds[0]]:
            x, y = sds[0].get(key), sd.get(key)
            if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor) or (
                    isinstance(x, torch.Tensor) and (x.shape, x.dtype) != (y.shape, y.dtype)):
                raise ConfigError(f"merge: {field}'s {key!r} is {_desc(y)}, the base's "
                                  f"{_desc(x)}: merged models must have one shape")
    merger = TensorMerger(cfg, model_cfg, len(sds))
    out: dict[str, Any] = {}
    for key, base in sds[0].items():
        if not isinstance(base, torch.Tensor):
            out[key] = base
            continue
        # Copies: the arithmetic works in place (on the base, and on the first other for
        # task vectors combined by slerp); the inputs stay as they were.
        tensors = [sd[key].detach().clone() for sd in sds]
        parts = [merger.views(key, t) for t in tensors]
        merger.merge_views([p[0] for p in parts], parts[0][1])
        out[key] = tensors[0]
    for f in merger.unused_filters():
        log.warning("merge rule filter %r matches no tensor", f)
    return out


def merge(inputs: Sequence[Input], method: str = "slerp", *,
          config: ModelConfig | Any | None = None, **settings: Any) -> dict[str, Any]:
    """Merge models or full state dicts in memory, the base first: ``method`` slerp (t=0 is
    the base), linear or task; ``settings``: the other ``MergeConfig`` fields (``t``,
    ``weights``, ``normalize``, ``scale``, ``combine``, ``dot_threshold``, ``eps``,
    ``allow_extrapolation``), as the ``merge`` verb's recipe takes them. Returns the merged
    full (TP=1/PP=1) state dict; see ``merge_models``."""
    fields = {f.name for f in dataclasses.fields(MergeConfig)} - {"method"}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ConfigError(f"merge: unknown setting {unknown[0]!r} (one of: "
                          f"{', '.join(sorted(fields))})")
    if method not in ("slerp", "linear", "task"):
        raise ConfigError(f"merge: method={method!r} must be slerp, linear or task")
    return merge_models(inputs, MergeConfig(method=method, **settings), config)


def _desc(x: Any) -> str:
    if x is None:
        return "absent"
    if isinstance(x, torch.Tensor):
        return f"{list(x.shape)} {x.dtype}"
    return f"a {type(x).__name__}"

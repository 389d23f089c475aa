"""The merge recipe (``merge:`` section) and mergekit's per-tensor parameter rules.

A parameter (``t``, or one input's weight) is, as in mergekit's YAML:

* a number: every tensor;
* a list of numbers: a gradient over layer depth, layer ``i`` of ``L`` at ``i / (L - 1)``
  (``1`` when ``L == 1``) linearly interpolated between the list's neighbours; tensors outside
  the layers (embeddings, final norm, output layer) take the first value (mergekit plans them
  with ``t = 0``);
* a list of rules ``{filter: NAME, value: number or list}``: the first rule whose ``filter``
  is a substring of the tensor's Hugging Face name (``model.layers.3.self_attn.q_proj.weight``)
  wins; ``filter: "*"`` or no filter matches every tensor (the fallback).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from nemo_minitron.config import ConfigError


def _check_setting(name: str, value: Any, lo: float | None, hi: float | None) -> None:
    """One-line error unless ``value`` is a number, a list of numbers or a list of rules, every
    number within ``[lo, hi]``."""
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{name}={value!r} must be a number, a list of numbers or a list "
                          f"of {{filter, value}} rules")
    if isinstance(value, int | float):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{name}={value!r} is outside [{lo}, {hi}] (set "
                              f"merge.allow_extrapolation=true to allow it)")
        return
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{name}={value!r} must be a number, a non-empty list of numbers or "
                          f"a list of {{filter, value}} rules")
    if all(isinstance(v, dict) for v in value):
        for i, rule in enumerate(value):
            unknown = set(rule) - {"filter", "value"}
            if unknown or "value" not in rule:
                raise ConfigError(f"{name}[{i}]={rule!r} must be a mapping with keys filter "
                                  f"and value")
            if rule.get("filter") is not None and not isinstance(rule["filter"], str):
                raise ConfigError(f"{name}[{i}].filter={rule['filter']!r} must be a string")
            if isinstance(rule["value"], dict) or (
                    isinstance(rule["value"], list)
                    and any(isinstance(v, dict) for v in rule["value"])):
                raise ConfigError(f"{name}[{i}].value must be a number or a list of numbers")
            _check_setting(f"{name}[{i}].value", rule["value"], lo, hi)
        return
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{name}[{i}]={v!r} must be a number (or every entry a rule)")
        _check_setting(f"{name}[{i}]", v, lo, hi)


def evaluate(setting: Any, tensor_name: str, depth: float) -> float | None:
    """The value of ``setting`` for ``tensor_name`` at relative layer depth ``depth``
    (mergekit's ``evaluate_setting``); None when no rule matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, int | float):
        return float(setting)
    if all(isinstance(e, int | float) for e in setting):
        scaled = depth * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for rule in setting:
        f = rule.get("filter")
        if f is None or f == "*" or f in tensor_name:
            return evaluate(rule["value"], tensor_name, depth)
    return None


def filters(setting: Any) -> list[str]:
    """The name filters of a rule list (for the warning about rules that match nothing)."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return []
    return [r["filter"] for r in setting
            if isinstance(r, dict) and r.get("filter") not in (None, "*")]


@dataclass(kw_only=True)
class MergeConfig:
    """How to merge checkpoints of one shape (mergekit's conventions and defaults)."""

    method: Literal["slerp", "linear", "task"] = "slerp"
    """slerp: spherical interpolation from --base (t=0) to the one --other (t=1). linear:
    weighted average of --base and every --other. task: task arithmetic relative to --base
    (the common model the others were fine-tuned from)."""
    t: Any = 0.5
    """Interpolation factor of slerp (and of task with combine=slerp): a number, a list over
    layer depth, or a list of {filter, value} rules (first match wins)."""
    weights: list[Any] | None = None
    """linear: one weight per input (--base first, then each --other); task: one per --other.
    Each entry is a parameter like t (number, gradient or rules). Default: 1 for every input."""
    normalize: bool | None = None
    """Divide by the sum of the weights. Default: true for linear, false for task (mergekit)."""
    scale: float = 1.0
    """task: multiply the combined task vector by this (mergekit's lambda)."""
    combine: Literal["sum", "slerp"] = "sum"
    """task: sum the weighted task vectors (task arithmetic), or slerp between the two task
    vectors with t (exactly two --other)."""
    dot_threshold: float = 0.9995
    """slerp falls back to linear interpolation when |cos| of the angle between the two
    normalized tensors exceeds this (nearly colinear: the great circle is ill-defined)."""
    eps: float = 1e-8
    """slerp: a tensor whose norm is at most this is not normalized."""
    allow_extrapolation: bool = False
    """Allow t (and weights) outside [0, 1]."""

    def __post_init__(self) -> None:
        lo, hi = (None, None) if self.allow_extrapolation else (0.0, 1.0)
        _check_setting("merge.t", self.t, lo, hi)
        for i, w in enumerate(self.weights or []):
            _check_setting(f"merge.weights[{i}]", w, None if self.allow_extrapolation else 0.0,
                           None)
        if not 0 < self.dot_threshold <= 1:
            raise ConfigError(f"merge.dot_threshold={self.dot_threshold} must be in (0, 1]")
        if self.eps < 0:
            raise ConfigError(f"merge.eps={self.eps} must be >= 0")

    def check_inputs(self, n_other: int) -> None:
        """One-line error unless the number of --other inputs suits the method."""
        if self.method == "slerp" and n_other != 1:
            raise ConfigError(f"merge.method=slerp takes exactly one --other, got {n_other}")
        if self.method == "task" and self.combine == "slerp" and n_other != 2:
            raise ConfigError(f"merge.combine=slerp takes exactly two --other, got {n_other}")
        if n_other < 1:
            raise ConfigError("give at least one --other checkpoint")
        want = n_other + 1 if self.method == "linear" else n_other
        if self.weights is not None and self.method != "slerp" and len(self.weights) != want:
            raise ConfigError(f"merge.weights has {len(self.weights)} entries, "
                              f"merge.method={self.method} needs {want} (one per "
                              f"{'input' if self.method == 'linear' else '--other'})")


@dataclass(kw_only=True)
class MergeRecipe:
    """A merge recipe: the ``merge`` section."""

    merge: MergeConfig = field(default_factory=MergeConfig)
    """The merge."""

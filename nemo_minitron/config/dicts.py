"""YAML and ``key=value`` overrides <-> nested dicts <-> dataclasses: the reading rules every
recipe shares (unknown keys refused, types checked, renamed keys read with a warning)."""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from nemo_minitron.config.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "",
              base: T | None = None) -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types; keys
    a class renamed (its ``DEPRECATED_KEYS``, old -> new) are read with a warning. Keys not
    given keep ``base``'s values, and a nested section keeps its field's own default (a
    ``default_factory`` may differ from the section class's defaults: ``retrain.lr=...`` must
    not reset the rest of the bench's retraining schedule to ``TrainConfig``'s)."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for old, new in getattr(cls, "DEPRECATED_KEYS", {}).items():
        if old in data:
            if new in data:
                raise ConfigError(f"'{prefix}{old}' is the deprecated name of '{prefix}{new}'; "
                                  "give only the new one")
            warnings.warn(f"'{prefix}{old}' is deprecated; use '{prefix}{new}'", FutureWarning,
                          stacklevel=2)
            data = {(new if k == old else k): v for k, v in data.items()}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"unknown key '{prefix}{key}' (known: {', '.join(sorted(fields))})"
            )
        default = getattr(base, key) if base is not None else _section_default(fields[key])
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", default)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _section_default(f: dataclasses.Field) -> Any:
    """A field's default when it is a dataclass instance (a nested section), else None."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return value if dataclasses.is_dataclass(value) and not isinstance(value, type) else None


def _coerce(tp: Any, value: Any, name: str, default: Any = None) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{name}.",
                         base=default if isinstance(default, tp) else None)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name, default)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}={value!r} has the wrong type")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}={value!r} must be one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}={value!r} must be a list")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} must be a string")
        return value
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain nested dict (YAML/JSON safe)."""
    return dataclasses.asdict(obj)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=3e-4", "model.num_layers=2"]`` -> nested dict with YAML-typed values."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        # YAML reads "3e-4" as a string; accept it as a number.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else value
            except ValueError:
                pass
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[leaf] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base``."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def recipe_path(path: str | Path) -> Path:
    """``path``; a bare file name that is not here names a recipe shipped with the package
    (``tiny_cpu.yaml``, see ``utils.paths.recipes_dir``)."""
    p = Path(path)
    if not p.is_file() and p.name == str(path):
        from nemo_minitron.utils.paths import recipes_dir

        shipped = recipes_dir() / p.name
        if shipped.is_file():
            return shipped
    return p


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (``recipe_path``), with one-line errors for a missing or malformed
    file."""
    p = recipe_path(path)
    if p.is_dir():
        raise ConfigError(f"recipe {str(path)!r} is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping of sections")
    return data

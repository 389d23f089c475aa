"""User-named callables (``module:function``), e.g. a search score or a rewrite verifier."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from nemo_minitron.config import ConfigError


def load_callable(spec: str, field: str) -> Callable[..., Any]:
    """``module:function`` -> the function, or a one-line error naming ``field``."""
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name:
        raise ConfigError(f"{field}={spec!r} must look like module:function")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except Exception as e:  # ImportError, AttributeError, or the module's own failure
        raise ConfigError(f"{field}={spec!r} cannot be imported: "
                          f"{type(e).__name__}: {e}".replace("\n", " ")) from None
    if not callable(fn):
        raise ConfigError(f"{field}={spec!r} is not callable")
    return fn

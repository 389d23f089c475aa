"""The user-error type of every configuration check, and the positivity rule they share."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A user error in a recipe or override: the message names the field and the rule."""


def positive(name: str, value: Any) -> None:
    """One-line error unless ``value`` is a positive number (``name``: the key to blame)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive number")

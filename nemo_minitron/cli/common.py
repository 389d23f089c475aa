"""Shared pieces of the verbs: recipe + ``key=value`` arguments."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any, TypeVar

from nemo_minitron.utils.logging import get_logger
from nemo_minitron.utils.paths import recipes_dir

T = TypeVar("T")

log = get_logger("cli")

RECIPES = recipes_dir()


class DefaultsHelp(argparse.HelpFormatter):
    """``--help`` that names every argument's default, also of arguments without help text (a
    default of None or False, i.e. "not given", is left out; so is one the text names)."""

    @staticmethod
    def _names_default(action: argparse.Action) -> bool:
        d = action.default
        return (d is not None and d is not False and d != [] and d != argparse.SUPPRESS
                and (bool(action.option_strings) or action.nargs in ("?", "*"))
                and "%(default)" not in (action.help or ""))

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._names_default(action):
            action = copy.copy(action)  # argparse prints no help line for help=None
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not self._names_default(action):
            return action.help
        return f"{action.help or ''} (default: %(default)s)".lstrip()


def show_defaults(sub: argparse._SubParsersAction) -> None:
    """Every verb registered on ``sub`` so far names its defaults in ``--help``
    (``DefaultsHelp``): each module's ``register`` ends with this."""
    for parser in sub.choices.values():
        parser.formatter_class = DefaultsHelp


def recipe_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("recipe", nargs="?", default=default,
                   help="YAML recipe (default: %(default)s)" if default else
                   "YAML recipe (default: none, the built-in defaults)")
    p.set_defaults(default_recipe=default)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides such as train.lr=3e-4 model.num_layers=4")


def split_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """argparse cannot tell an optional recipe from a first override: an argument holding
    '=' is an override, and the verb's default recipe applies."""
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        overrides.insert(0, recipe)
        recipe = args.default_recipe
    return recipe, overrides


def sampling_config(build: Callable[..., T], **fields: Any) -> T:
    """``build(**fields)`` (a ``SamplingConfig`` or a function returning one) from command-line
    flags: a refusal names the flag the user typed (``--top-p=...``), not the field."""
    from nemo_minitron.config import ConfigError

    try:
        return build(**fields)
    except ConfigError as e:
        name, sep, rest = str(e).partition("=")
        if sep and name in fields:
            raise ConfigError(f"--{name.replace('_', '-')}={rest}") from None
        raise

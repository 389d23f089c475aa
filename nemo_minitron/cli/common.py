"""Shared pieces of the verbs: recipe + ``key=value`` arguments."""

from __future__ import annotations

import argparse
import ast
import copy
import inspect
from collections.abc import Callable
from pathlib import Path
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


PACKAGE = Path(__file__).resolve().parent.parent


def source_fields(module: str, cls: str) -> dict[str, tuple[str, Any, str]]:
    """Field -> (type, default, docstring) of dataclass ``cls`` in ``module``, read from its
    source with ``ast``: importing the module would import torch for every verb's ``--help``.
    Defaults are literals (a field without one is left out)."""
    tree = ast.parse((PACKAGE.parent / (module.replace(".", "/") + ".py")).read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    fields = {}
    for stmt, after in zip(body, [*body[1:], None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) \
                and stmt.value is not None and isinstance(after, ast.Expr):
            try:
                default = ast.literal_eval(stmt.value)
            except ValueError:  # a computed default (a factory): not a flag's
                continue
            fields[stmt.target.id] = (ast.unparse(stmt.annotation), default,
                                      inspect.cleandoc(ast.literal_eval(after.value)))
    return fields


def source_constant(module: str, name: str) -> Any:
    """The literal value of module-level ``name`` in ``module`` (read as ``source_fields``)."""
    tree = ast.parse((PACKAGE.parent / (module.replace(".", "/") + ".py")).read_text())
    return next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.AnnAssign | ast.Assign) and name in
                [t.id for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                 if isinstance(t, ast.Name)])


SAMPLING = ("nemo_minitron.eval.generate", "SamplingConfig")
"""Where the sampling flags come from."""
_TYPES = {"int": int, "float": float}


def sampling_args(p: argparse.ArgumentParser, defaults: dict[str, Any] | None = None, *,
                  only_given: bool = False, notes: dict[str, str] | None = None) -> None:
    """Add ``SamplingConfig``'s fields as flags (``--max-new-tokens``, ``--temperature``,
    ...; its docstrings are the help). ``greedy`` is ``--sample`` (false) where greedy is the
    default, else ``--greedy``. ``defaults``: the verb's own defaults over the class's;
    ``only_given``: a flag not typed is absent from the arguments (the verb's function owns
    the defaults; the help still names them); ``notes``: extra help per field."""
    fields = source_fields(*SAMPLING)
    defaults = {**{k: d for k, (_, d, _) in fields.items()}, **(defaults or {})}
    for name, (tp, _, doc) in fields.items():
        if name not in defaults or defaults[name] is None:
            continue  # stop_tokens: the tokenizer's, not a flag
        text = doc[0].lower() + doc[1:].rstrip(".").replace("\n", " ")
        if notes and name in notes:
            text += f"; {notes[name]}"
        default = defaults[name]
        if name == "greedy":
            flag, dest, value = ("--sample", "sample", False) if default else \
                ("--greedy", "greedy", True)
            text = f"greedy={str(value).lower()} (greedy: {text})"
            p.add_argument(flag, dest=dest, action="store_true",
                           default=argparse.SUPPRESS if only_given else False, help=text)
            continue
        if only_given:
            text += f" (default: {default})"
        p.add_argument(f"--{name.replace('_', '-')}", type=_TYPES[tp],
                       default=argparse.SUPPRESS if only_given else default, help=text)


def sampling_values(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling fields given on the command line (``sampling_args``), by field name."""
    fields = source_fields(*SAMPLING)
    given = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    if hasattr(args, "sample"):
        given["greedy"] = not args.sample
    return given

"""Packages that are also functions: ``nemo_minitron.prune(model, plan)`` and
``nemo_minitron.merge([a, b], ...)`` while ``nemo_minitron.prune.plan`` stays a module.

A package attribute of the same name as a subpackage cannot be a function: importing the
subpackage sets the attribute to the module (and a function there would break
``import nemo_minitron.prune.plan as p`` and dotted look-ups). So the subpackage itself is made
callable, through its module class; the function is imported on the first call, which keeps
importing the package free of torch and megatron-core.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def make_callable(package: str, target: str) -> None:
    """Calling the module ``package`` calls ``target`` (``module:function``)."""
    module_name, _, function = target.partition(":")

    class CallablePackage(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(module_name), function)(*args, **kwargs)

    CallablePackage.__call__.__doc__ = f"Calls ``{target}`` (see its docstring)."
    sys.modules[package].__class__ = CallablePackage

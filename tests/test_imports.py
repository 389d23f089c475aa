"""No module imports a private (``_``-prefixed) name from another subpackage: stages talk to
each other through public functions only. Importing the package and its public API changes
nothing global in the user's process."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nemo_minitron
from tests.helpers.imports import ROOT, module_name, resolve


def _area(module: str) -> str:
    """``nemo_minitron.<area>...`` -> ``<area>`` (a top-level module is its own area)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def private_imports(root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = resolve(node, module, path.name == "__init__.py")
                if not source.startswith("nemo_minitron") or _area(source) == _area(module):
                    continue
                names = [a.name for a in node.names]
                targets = [f"{source}.{n}" for n in names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("nemo_minitron")
                           and _area(a.name) != _area(module)]
            else:
                continue
            for t in targets:
                rest = t.split(".")[2:] if t.count(".") > 1 else t.split(".")[1:]
                if any(p.startswith("_") and not p.startswith("__") for p in rest):
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} imports {t}")
    return found


def test_no_private_imports_across_subpackages():
    assert private_imports() == []


def test_the_walk_sees_a_private_import(tmp_path):
    # The checker itself: a private import planted across subpackages is reported.
    pkg = tmp_path / "nemo_minitron"
    (pkg / "a").mkdir(parents=True)
    (pkg / "b").mkdir()
    for f in ("__init__.py", "a/__init__.py", "b/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "a" / "x.py").write_text("def _hidden():\n    pass\n")
    (pkg / "b" / "y.py").write_text("from nemo_minitron.a.x import _hidden\n"
                                    "from ..a import x\n")
    (pkg / "a" / "z.py").write_text("from nemo_minitron.a.x import _hidden\n")  # same area
    assert private_imports(pkg) == ["nemo_minitron/b/y.py:1 imports nemo_minitron.a.x._hidden"]


# What torch, megatron-core and numpy (not nemo_minitron) add to the process when imported:
# torch and numpy install warning filters of their own, so they are imported before the
# snapshot that nemo_minitron's own imports are checked against.
_THIRD_PARTY = ["torch", "torch.distributed", "numpy", "yaml", "megatron.core",
                "megatron.core.models.gpt", "megatron.core.pipeline_parallel",
                "megatron.core.dist_checkpointing", "megatron.core.tensor_parallel"]
_NOTHING_GLOBAL = """
import importlib, logging, sys, warnings
for name in {third!r}:
    importlib.import_module(name)
f, h = list(warnings.filters), list(logging.getLogger().handlers)
cuda = dict(vars(sys.modules["torch"].cuda)) if "torch" in sys.modules else None
import nemo_minitron
if {third!r} == []:
    assert not any(m.split(".")[0] in ("torch", "megatron") for m in sys.modules), "heavy import"
for name in {modules!r}:
    importlib.import_module(name)
for name in nemo_minitron.__all__ if {third!r} else []:
    getattr(nemo_minitron, name)
assert warnings.filters == f, [x for x in warnings.filters if x not in f]
assert logging.getLogger().handlers == h, logging.getLogger().handlers
if cuda is not None:
    import torch
    from nemo_minitron.parallel import cpu
    assert not cpu.active() and torch.overrides._get_current_function_mode() is None
    assert dict(vars(torch.cuda)) == cuda, "torch.cuda patched"
print("ok")
"""


def _public_modules() -> list[str]:
    return sorted({target.partition(":")[0]
                   for target in nemo_minitron._EXPORTS.values()})


@pytest.mark.parametrize("third_party", [False, True], ids=["bare", "after-torch"])
def test_importing_the_package_changes_nothing_global(third_party):
    """A user's process keeps its warning filters, root-logger handlers and torch.cuda after
    ``import nemo_minitron`` and every public name's module (bare: the package alone, which
    imports neither torch nor megatron-core; after-torch: every public module, with the
    third-party libraries imported before the snapshot, since they add filters themselves)."""
    modules = _public_modules() if third_party else []
    code = _NOTHING_GLOBAL.format(third=_THIRD_PARTY if third_party else [], modules=modules)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT.parent, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_the_import_check_sees_a_global_filter(tmp_path):
    """The check itself: a module that installs a warning filter on import fails it."""
    (tmp_path / "leaky.py").write_text("import warnings\nwarnings.filterwarnings('ignore')\n")
    code = _NOTHING_GLOBAL.format(third=[], modules=["leaky"])
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT.parent, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert run.returncode != 0 and "AssertionError" in run.stderr

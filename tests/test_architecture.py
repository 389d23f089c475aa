"""The package's structure: no import cycle among its modules (imports inside functions and
under ``TYPE_CHECKING`` count too), every file under 400 lines, and no stage opening another
stage's files by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers.imports import ROOT, cycles, import_graph, module_name

KNOWN_CYCLES: list[list[str]] = []
"""Cycles tolerated for now, each with the issue that removes it (none left)."""

MAX_LINES = 400


def test_no_import_cycle_among_modules():
    found = [c for c in cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert found == [], "import cycles (module -> module): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_the_cycle_check_sees_cycles(tmp_path):
    # The checker itself: a cycle through an import inside a function, a relative import and
    # a package's __init__ is found; a chain without a way back is not.
    pkg = tmp_path / "nemo_minitron"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from nemo_minitron.a.x import f\n")
    (pkg / "a" / "x.py").write_text("def f():\n    from .. import b\n")
    (pkg / "b.py").write_text("from nemo_minitron.a import x\nfrom nemo_minitron import c\n")
    (pkg / "c.py").write_text("import os\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from nemo_minitron import e\n")
    (pkg / "e.py").write_text("from nemo_minitron import d\n")
    assert cycles(import_graph(pkg)) == [["nemo_minitron.a.x", "nemo_minitron.b"],
                                         ["nemo_minitron.d", "nemo_minitron.e"]]


def test_every_file_of_the_package_is_under_400_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in sorted(ROOT.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) >= MAX_LINES}
    assert long == {}


STAGE_FILES = {
    "pruning": {"nemo_minitron.prune"},
    "summary.json": {"nemo_minitron.prune"},
    "winner": {"nemo_minitron.search"},
    "candidates.json": {"nemo_minitron.search"},
    "candidates": {"nemo_minitron.search"},
    "result.json": {"nemo_minitron.search"},
    "scores.pt": {"nemo_minitron.prune", "nemo_minitron.search"},
    "report.md": {"nemo_minitron.prune", "nemo_minitron.search"},
}
"""A stage's file and directory names -> the packages that may spell them (``search`` has
its own ``scores.pt`` and ``report.md``; it reads prune's through ``prune.result``)."""
STAGE_FUNCTIONS = {"report_dir": "nemo_minitron.prune"}
"""Public functions that locate a stage's files, used only inside their package."""


def _strings(tree: ast.AST) -> list[ast.Constant]:
    """String constants that are not docstrings (docstrings may describe a layout)."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}
    # An attribute docstring: a string statement right after an assignment.
    docs |= {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)
             and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
    return sorted((n for n in ast.walk(tree) if isinstance(n, ast.Constant)
                   and isinstance(n.value, str) and id(n) not in docs),
                  key=lambda n: (n.lineno, n.col_offset))


def foreign_stage_files(root: Path = ROOT) -> list[str]:
    """``file:line`` of every module that spells another stage's file name, or imports a
    function locating another stage's files."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        tree = ast.parse(path.read_text(), str(path))
        for node in _strings(tree):
            owners = STAGE_FILES.get(node.value, set())
            if owners and not any(module == o or module.startswith(o + ".") for o in owners):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.value!r}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    owner = STAGE_FUNCTIONS.get(a.name)
                    if owner and node.module.startswith(owner) and \
                            not (module == owner or module.startswith(owner + ".")):
                        found.append(f"{path.relative_to(root.parent)}:{node.lineno} "
                                     f"{a.name}")
    return found


def test_no_stage_opens_another_stages_files_by_name():
    assert foreign_stage_files() == []


@pytest.mark.parametrize("code, hit", [
    ('f = out / "pruning" / "summary.json"\n', ["'pruning'", "'summary.json'"]),
    ('from nemo_minitron.prune.result import report_dir\n', ["report_dir"]),
    ('"""Reads pruning/summary.json."""\nX = 1\n"""The ``winner`` of a search."""\n', []),
    ('flag = "report.md"\n', ["'report.md'"]),
])
def test_the_stage_file_check_sees_a_foreign_name(tmp_path, code, hit):
    # The checker itself, on a planted package: names in code are found, docstrings are not,
    # and the owner may spell its own names.
    pkg = tmp_path / "nemo_minitron"
    (pkg / "prune").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "prune" / "__init__.py").write_text("")
    (pkg / "prune" / "result.py").write_text(code)
    (pkg / "demo.py").write_text(code)
    found = foreign_stage_files(pkg)
    assert [f.split(" ", 1)[1] for f in found] == hit
    assert all(f.startswith("nemo_minitron/demo.py:") for f in found)


def test_no_test_module_imports_another():
    # Shared helpers live in helper modules (tests/helpers/, tests/cli.py, tests/dist.py, ...):
    # importing a test module runs its collection-time code and couples unrelated tests.
    tests = Path(__file__).parent
    found = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                last = name.split(".")[-1]
                if name.startswith("tests.") and (last.startswith("test_") or last == "conftest"):
                    found.append(f"{path.relative_to(tests.parent)}:{node.lineno} {name}")
    assert found == []

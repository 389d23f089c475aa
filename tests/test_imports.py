"""No module imports a private (``_``-prefixed) name from another subpackage: stages talk to
each other through public functions only."""

from __future__ import annotations

import ast
from pathlib import Path

import nemo_minitron

ROOT = Path(nemo_minitron.__file__).parent


def _area(module: str) -> str:
    """``nemo_minitron.<area>...`` -> ``<area>`` (a top-level module is its own area)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def private_imports() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(node, module, path.name == "__init__.py")
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
                    found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} imports {t}")
    return found


def test_no_private_imports_across_subpackages():
    assert private_imports() == []


def test_the_walk_sees_a_private_import(tmp_path, monkeypatch):
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
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", pkg)
    assert private_imports() == ["nemo_minitron/b/y.py:1 imports nemo_minitron.a.x._hidden"]

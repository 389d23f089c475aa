"""The files shipped beside the code: ``recipes/`` and ``launcher/`` at the top of a checkout,
installed inside the package (``nemo_minitron/recipes``, ``nemo_minitron/launcher``) by
``pip install .``, so verb defaults work from any directory."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent


def _shipped(name: str) -> Path:
    for base in (_PACKAGE / name, _PACKAGE.parent / name):  # installed, then a checkout
        if base.is_dir():
            return base
    raise FileNotFoundError(f"the {name}/ directory shipped with nemo_minitron is missing "
                            f"(looked in {_PACKAGE} and {_PACKAGE.parent})")


def recipes_dir() -> Path:
    """The shipped recipes (``tiny_cpu.yaml``, ``method_bench.yaml``, ...)."""
    return _shipped("recipes")


def launcher_dir() -> Path:
    """The SLURM launcher: ``<stage>.sbatch`` scripts, ``job.sh`` and the ``launch`` template."""
    return _shipped("launcher")


def checkout_dir() -> Path | None:
    """The source checkout this package runs from (``setup.py`` beside the package: a clone,
    or an editable install of one), or None for an installed package."""
    return _PACKAGE.parent if (_PACKAGE.parent / "setup.py").is_file() else None

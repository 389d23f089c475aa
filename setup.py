"""Packages of the distribution; the metadata lives in pyproject.toml.

The top-level ``recipes/`` and ``launcher/`` are installed inside the package
(``nemo_minitron/recipes``, ``nemo_minitron/launcher``; found by ``nemo_minitron.utils.paths``),
so verb defaults and the sbatch scripts work outside a checkout.
"""

from setuptools import find_packages, setup

DATA = {"nemo_minitron.recipes": "recipes", "nemo_minitron.launcher": "launcher"}

setup(
    packages=find_packages(include=["nemo_minitron", "nemo_minitron.*"]) + list(DATA),
    package_dir=DATA,
    package_data={"nemo_minitron.recipes": ["*.yaml"],
                  "nemo_minitron.launcher": ["*.sbatch", "*.sh", "*.md", "templates/*.sh"]},
)

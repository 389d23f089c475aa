"""The verb registry (``nemo_minitron/verbs.py``) against what actually runs: the parser's
verbs, their modules, their recipe classes, and the checkpoint each leaves (checked against a
real run in the stage tests: ``tests/search/test_pipeline.py`` for the winner,
``tests/launch`` for training stages)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from nemo_minitron import verbs
from nemo_minitron.cli import MODULES, build_parser
from nemo_minitron.config import ConfigError, Recipe
from nemo_minitron.distill.stage import DistillRecipe
from nemo_minitron.prune.stage import PruneRecipe
from nemo_minitron.search.stage import SearchRecipe


def _parser_verbs() -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_the_registry_is_the_command_lines_verbs_in_help_order():
    assert [v.name for v in verbs.VERBS] == _parser_verbs()
    # Each verb is defined by the module the registry names, and by no other.
    defined = {name: module for module, m in MODULES.items() for name in m.VERBS}
    assert defined == {v.name: v.cli for v in verbs.VERBS}


def test_recipe_classes_are_the_stages_own():
    assert {v.name: v.recipe_class() for v in verbs.VERBS if v.recipe} == {
        "pretrain": Recipe, "finetune": Recipe, "distill": DistillRecipe,
        "prune": PruneRecipe, "search": SearchRecipe}


def test_outputs():
    out = Path("/w/stage")
    got = {v.name: v.output(out) for v in verbs.VERBS if v.output is not None}
    assert got == {"prune": out, "search": out / "winner", "import-hf": out,
                   "import-gguf": out, "import-nemo2": out, "merge": out}


@pytest.mark.parametrize("name", ["launch", "nonsense"])
def test_a_stage_cannot_run_launch_or_an_unknown_verb(name):
    with pytest.raises(ConfigError, match=f"stages\\[0\\].verb='{name}' is not a nemo-minitron "
                                          "verb \\(known: bench, bench-method, data, demo, "):
        verbs.verb(name, "stages[0]")

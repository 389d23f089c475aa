"""The verbs of ``nemo-minitron``, in ``--help`` order: each one's command-line module, the
recipe class a stage's whole config is checked against, and where its output checkpoint lies.

The command line (``cli``) registers exactly these verbs; the launcher (``launch``) reads this
table to check a stage's verb, validate its recipe and find the checkpoint it produces, so it
never imports the command line above it. Nothing here imports torch: ``--help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nemo_minitron.config import ConfigError
from nemo_minitron.search.result import winner_dir

Output = Callable[[Path], Path] | None
"""A verb's output checkpoint from its ``--out`` directory; None: a training run (its final
checkpoint ``<out>/checkpoints/step_<train.train_iters>``)."""


def _itself(out: Path) -> Path:
    return out


@dataclass(frozen=True)
class Verb:
    """One verb of the command line."""

    name: str
    """What the user types (``nemo-minitron <name>``)."""
    cli: str
    """The module of ``nemo_minitron.cli`` that defines its arguments and runs it."""
    recipe: str | None = None
    """``module:Class`` of the recipe ``launch``/``validate`` check a stage's whole config
    against; None: only the sections it shares with pretraining."""
    output: Output = None
    """Its output checkpoint from its output directory (None: it trains under it)."""

    def recipe_class(self) -> type | None:
        """The recipe class, imported on demand (a stage's package imports torch)."""
        if self.recipe is None:
            return None
        module, _, name = self.recipe.partition(":")
        cls: type = getattr(importlib.import_module(module), name)
        return cls


_BASE = "nemo_minitron.config:Recipe"
VERBS: tuple[Verb, ...] = (
    Verb("demo", "demo"),
    Verb("bench-method", "bench_method"),
    Verb("data", "data"),
    Verb("pretrain", "train", _BASE),
    Verb("finetune", "train", _BASE),
    Verb("instruct-data", "data"),
    Verb("sft", "train"),
    Verb("distill", "distill", "nemo_minitron.distill.stage:DistillRecipe"),
    Verb("teacher-cache", "distill"),
    Verb("prune", "prune", "nemo_minitron.prune.stage:PruneRecipe", _itself),
    Verb("search", "search", "nemo_minitron.search.stage:SearchRecipe", winner_dir),
    Verb("launch", "launch"),
    Verb("validate", "launch"),
    Verb("import-hf", "interop", output=_itself),
    Verb("import-gguf", "interop", output=_itself),
    Verb("import-nemo2", "interop", output=_itself),
    Verb("export-hf", "interop"),
    Verb("eval", "eval"),
    Verb("generate", "eval"),
    Verb("lm-eval", "eval"),
    Verb("bench", "eval"),
    Verb("merge", "merge", output=_itself),
    Verb("specdec", "specdec"),
    Verb("self-distill", "selfdistill"),
)
"""Every verb, in the order ``nemo-minitron --help`` lists them."""

BY_NAME: dict[str, Verb] = {v.name: v for v in VERBS}
"""The verbs by name."""


def verb(name: str, where: str) -> Verb:
    """The verb ``name`` a stage runs (``launch`` excluded: a stage cannot launch), or a
    one-line error naming ``where`` it was given."""
    if name not in BY_NAME or name == "launch":
        known = sorted(set(BY_NAME) - {"launch"})
        raise ConfigError(f"{where}.verb={name!r} is not a nemo-minitron verb (known: "
                          f"{', '.join(known)})")
    return BY_NAME[name]


"""``bench-method``: Minitron's published findings reproduced in miniature on the embedded corpus.

One command pretrains a teacher (or takes one), runs every comparison through the library's own
stages (``runner.Study``: prune, distill, finetune, pretrain, bench), and writes a Markdown
report with PNG plots (``report``). The comparisons live in ``experiments``; the recipe in
``config`` and ``recipes/method_bench.yaml``. Re-running the same command reuses finished units.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.method.config import SECTIONS, MethodBenchRecipe, load_bench_recipe
from nemo_minitron.config import ConfigError, to_dict

__all__ = ["MethodBenchRecipe", "load_bench_recipe", "run_method_bench"]


def _check_same_recipe(recipe: MethodBenchRecipe, out: Path) -> None:
    """Units are cached by name: refuse to mix results of different recipes in one ``out``."""
    from nemo_minitron.utils.fs import atomic_write_json

    mine = to_dict(recipe)
    mine["study"].pop("sections")
    f = out / "recipe.json"
    if f.is_file():
        old = json.loads(f.read_text())
        if old != json.loads(json.dumps(mine)):
            diff = next((f"{k}.{j}" for k in mine for j in mine[k]
                         if old.get(k, {}).get(j) != json.loads(json.dumps(mine[k][j]))),
                        "a setting") if mine.keys() == old.keys() else "the set of sections"
            raise ConfigError(f"--out {out} holds a benchmark run with another recipe ({diff} "
                              "differs); use a new --out or the same settings")
    else:
        atomic_write_json(f, mine)


def run_method_bench(recipe: MethodBenchRecipe, out: str | Path, report_dir: str | Path,
                     command: str) -> Path:
    """Run (or resume) every section of ``recipe.study.sections``; returns the report path."""
    from benchmarks.method.experiments import Experiments
    from benchmarks.method.report import write_report
    from benchmarks.method.runner import Study
    from nemo_minitron.checkpoint.io import load_model_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_recipe(recipe, out)
    t0 = time.perf_counter()
    study = Study(recipe, out)
    src = load_model_config(study.teacher())
    ex = Experiments(study, src)
    sections = [getattr(ex, name)() for name in SECTIONS if name in recipe.study.sections]
    # Compute time is the sum over units, so a resumed run reports the whole cost.
    minutes = sum(json.loads(f.read_text()).get("seconds", 0.0)
                  for f in (out / "units").glob("*.json")) / 60
    n, s = recipe.study.eval_samples, src.seq_length
    desc = (f"on one fixed set of {n} held-out sequences of {s} tokens (the validation split at "
            f"data.seed={recipe.teacher.data.seed})")
    path = write_report(sections, Path(report_dir), command=command, minutes=minutes,
                        eval_desc=desc, seeds=recipe.study.seeds,
                        note=recipe.study.report_note)
    from nemo_minitron.utils.logging import get_logger

    get_logger("method_bench").info("report %s (%.0f s in this run)", path,
                                    time.perf_counter() - t0)
    return path

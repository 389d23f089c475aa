"""The README's first command: the end-to-end demo on the embedded default.

Build the embedded corpus and tokenizer, pretrain the tiny teacher, prune it to about half its
parameters (``recipes/tiny_cpu_prune.yaml``), distill the teacher into the pruned model
(``recipes/tiny_cpu_distill.yaml``), and print the validation losses of the teacher, the
one-shot pruned and the distilled model, and the teacher's throughput. Each stage resumes or is
reused when the command runs again. ``OUT/data`` links to the corpus, so that
``OUT/data/corpus`` is the ``--data`` prefix of the README's later commands.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from nemo_minitron.config import DataConfig, load_recipe
from nemo_minitron.data.embedded import embedded_dir
from nemo_minitron.utils.fs import read_jsonl_records
from nemo_minitron.utils.logging import get_logger
from nemo_minitron.utils.paths import recipes_dir
from nemo_minitron.utils.rank import is_rank0

log = get_logger("demo")


PRUNE_RECIPE = recipes_dir() / "tiny_cpu_prune.yaml"
DISTILL_RECIPE = recipes_dir() / "tiny_cpu_distill.yaml"


def run_demo(recipe_path: str | None, overrides: list[str], out: str,
             prune_recipe: str | None = None, prune_overrides: list[str] | None = None,
             distill_overrides: list[str] | None = None) -> dict:
    """Run the demo stages under ``out``; returns the summary it prints. ``data.*``
    overrides apply to every stage."""
    from nemo_minitron.distill.stage import DistillRecipe, distill
    from nemo_minitron.prune import result as prune_result
    from nemo_minitron.prune.stage import PruneRecipe, prune
    from nemo_minitron.train.pretrain import completed, pretrain

    recipe = load_recipe(recipe_path, overrides)
    out_dir = Path(out)
    teacher = completed(pretrain(recipe, out_dir / "teacher"))
    data_prefix = _link_corpus(recipe.data, out_dir)
    data_overrides = [o for o in overrides if o.startswith("data.")]
    p_recipe = load_recipe(prune_recipe or PRUNE_RECIPE,
                           data_overrides + list(prune_overrides or []), cls=PruneRecipe)
    pruned_dir = out_dir / "pruned"
    done = prune_result.read(pruned_dir)
    if done is not None:
        pruned = done.summary
        log.info("reusing %s (delete it to prune again)", pruned_dir)
    else:
        pruned = prune(teacher["final"], str(pruned_dir), p_recipe)
    d_recipe = load_recipe(DISTILL_RECIPE, data_overrides + list(distill_overrides or []),
                           cls=DistillRecipe)
    distilled = completed(distill(d_recipe, teacher["final"], str(pruned_dir),
                                  out_dir / "distilled"))
    speeds = [r["tokens_per_s"] for r in read_jsonl_records(out_dir / "teacher" / "metrics.jsonl")
              if r.get("kind") == "speed"]
    history = teacher["history"]
    summary = {
        "data_prefix": data_prefix,
        "teacher_checkpoint": teacher["final"],
        "teacher_valid_loss_init": history[0]["lm loss"] if history else math.nan,
        "teacher_valid_loss": teacher["valid"].get("lm loss", math.nan),
        "teacher_tokens_per_s": sum(speeds) / len(speeds) if speeds else math.nan,
        "teacher_params": pruned["source_params"],
        "pruned_checkpoint": str(pruned_dir),
        "pruned_params": pruned["pruned_params"],
        "pruned_valid_loss_one_shot": pruned["pruned_valid_loss"],
        "distilled_checkpoint": distilled["final"],
        "distilled_valid_loss": distilled["valid"].get("lm loss", math.nan),
        "distilled_valid_kd_loss": distilled["valid"].get("kd loss", math.nan),
    }
    log.info("teacher: validation loss %.4f (at init %.4f), %.0f tokens/s, checkpoint %s",
             summary["teacher_valid_loss"], summary["teacher_valid_loss_init"],
             summary["teacher_tokens_per_s"], summary["teacher_checkpoint"])
    log.info("pruned: %d -> %d parameters, one-shot validation loss %.4f",
             summary["teacher_params"], summary["pruned_params"],
             summary["pruned_valid_loss_one_shot"])
    log.info("distilled: validation loss %.4f (KL to the teacher %.4f), checkpoint %s",
             summary["distilled_valid_loss"], summary["distilled_valid_kd_loss"],
             summary["distilled_checkpoint"])
    if is_rank0():
        print(json.dumps(summary, indent=2))
    return summary


def _link_corpus(data: DataConfig, out_dir: Path) -> str:
    """The indexed-dataset prefix the demo trained on. The embedded corpus lives in the data
    cache under a versioned name; ``OUT/data`` links to it, so that ``OUT/data/corpus`` is a
    stable ``--data`` prefix for the later commands (README)."""
    if data.path is not None:
        return data.path
    link = out_dir / "data"
    if is_rank0():
        tmp = out_dir / f".data.link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(embedded_dir(data).resolve(), tmp)
        os.replace(tmp, link)  # atomic, also over an older link
    return str(link / "corpus")

"""The README's first command: the end-to-end demo on the embedded default.

For now: build the embedded corpus and tokenizer, pretrain the tiny teacher, print its
validation loss and throughput. Pruning and distillation join as those stages land.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch.distributed as dist

from nemo_minitron.config import load_recipe
from nemo_minitron.utils.logging import get_logger

log = get_logger("demo")


def run_demo(recipe_path: str | None, overrides: list[str], out: str) -> dict:
    """Run the demo stages under ``out``; returns the summary it prints."""
    from nemo_minitron.train.pretrain import pretrain

    recipe = load_recipe(recipe_path, overrides)
    out_dir = Path(out)
    teacher = pretrain(recipe, out_dir / "teacher")
    speeds = [json.loads(line)["tokens_per_s"]
              for line in (out_dir / "teacher" / "metrics.jsonl").read_text().splitlines()
              if '"speed"' in line]
    history = teacher["history"]
    summary = {
        "teacher_checkpoint": teacher["final"],
        "teacher_valid_loss_init": history[0]["lm loss"] if history else math.nan,
        "teacher_valid_loss": teacher["valid"].get("lm loss", math.nan),
        "teacher_tokens_per_s": sum(speeds) / len(speeds) if speeds else math.nan,
    }
    log.info("teacher: validation loss %.4f (at init %.4f), %.0f tokens/s, checkpoint %s",
             summary["teacher_valid_loss"], summary["teacher_valid_loss_init"],
             summary["teacher_tokens_per_s"], summary["teacher_checkpoint"])
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(summary, indent=2))
    return summary

"""Benchmark (not a test): one-shot validation loss of the same pruned shape under activation
importance vs random vs weight-magnitude scores, RMSNorm rescaling on vs off, and the time of
importance estimation as a ratio to a plain forward pass over the same calibration samples.

    .venv/bin/python benchmarks/prune_methods.py runs/demo/teacher/checkpoints/step_0000600 \
        [recipes/tiny_cpu_prune.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from nemo_minitron.checkpoint.io import load_model
from nemo_minitron.config import load_recipe
from nemo_minitron.data.datasets import build_gpt_datasets
from nemo_minitron.data.resolve import resolve_data
from nemo_minitron.demo import PRUNE_RECIPE
from nemo_minitron.importance.baselines import magnitude_scores, random_scores
from nemo_minitron.importance.estimator import estimate_importance
from nemo_minitron.importance.scores import Scores
from nemo_minitron.model.forward import forward_pass, lm_loss
from nemo_minitron.model.full_state import gather_full_state_dict
from nemo_minitron.parallel.runtime import init_distributed
from nemo_minitron.prune.apply import prune_model
from nemo_minitron.prune.plan import make_plan
from nemo_minitron.prune.stage import PruneRecipe, calib_sequences
from nemo_minitron.utils.logging import get_logger, setup_logging

log = get_logger("bench")


def _same_depth(baseline: Scores, like: Scores) -> Scores:
    # Same layers removed as the activation scores: compare the width criteria alone.
    return dataclasses.replace(baseline, num_layers=like.num_layers.clone())


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="the teacher checkpoint to prune")
    ap.add_argument("recipe", nargs="?", default=str(PRUNE_RECIPE),
                    help="prune recipe (default: %(default)s)")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="recipe overrides, e.g. calib.num_samples=64")
    args = ap.parse_args(argv)
    recipe_path, overrides = args.recipe, list(args.overrides)
    if "=" in recipe_path and not recipe_path.endswith((".yaml", ".yml")):
        recipe_path, overrides = str(PRUNE_RECIPE), [recipe_path, *overrides]  # no recipe given
    setup_logging()
    recipe = load_recipe(recipe_path, overrides, cls=PruneRecipe)
    init_distributed(recipe.parallel)
    model, cfg, tok = load_model(args.checkpoint)
    prefix, tok = resolve_data(recipe.data, tok)
    c = recipe.calib
    splits = build_gpt_datasets(prefix, tok, seq_length=cfg.seq_length, split=recipe.data.split,
                                seed=recipe.data.seed, num_samples=(c.num_samples,
                                                                     c.eval_samples, 0))
    calib = calib_sequences(splits.train, c.num_samples, "num_samples")[:, :-1]
    evals = calib_sequences(splits.valid, c.eval_samples, "eval_samples")

    forward_pass(model, calib[: c.micro_batch_size], micro_batch_size=c.micro_batch_size)
    t_fwd, t_imp = [], []
    for _ in range(3):  # interleaved, so machine noise hits both alike
        t0 = time.perf_counter()
        forward_pass(model, calib, micro_batch_size=c.micro_batch_size)
        t_fwd.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scores = estimate_importance(model, calib, micro_batch_size=c.micro_batch_size)
        t_imp.append(time.perf_counter() - t0)
    base = lm_loss(model, evals, c.micro_batch_size)
    rows = []
    variants = [("activation", scores, True), ("activation, no RMSNorm rescale", scores, False),
                ("weight magnitude",
                 _same_depth(magnitude_scores(gather_full_state_dict(model), cfg), scores), True)]
    variants += [(f"random (seed {s})", _same_depth(random_scores(cfg, s), scores), True)
                 for s in (0, 1)]
    for name, sc, rescale in variants:
        plan = make_plan(cfg, sc, recipe.target, rescale_norms=rescale)
        rows.append((name, lm_loss(prune_model(model, plan), evals, c.micro_batch_size)))
    print(f"teacher validation loss: {base:.4f} ({c.eval_samples} sequences)")
    print("| scores | one-shot validation loss | vs teacher |\n| --- | --- | --- |")
    for name, loss in rows:
        print(f"| {name} | {loss:.4f} | {loss - base:+.4f} |")
    ratio = min(t_imp) / min(t_fwd)
    print(f"importance estimation / plain forward over {c.num_samples} sequences: "
          f"{ratio:.3f} (best of 3 each: {min(t_imp):.2f}s vs {min(t_fwd):.2f}s; goal <= 1.15)")


if __name__ == "__main__":
    main(sys.argv[1:])

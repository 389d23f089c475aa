"""Offline teacher logits (``search.teacher_cache``): what the top-k approximation costs in
accuracy, and what the cache saves in search time.

1. ``--teacher T --student S``: on held-out windows of the embedded corpus (or ``--data``), the
   mean full-vocabulary forward KL(teacher || student) beside the cached top-k loss ``KL_k`` for
   each k, its relative error, and the teacher's mean tail mass (the error is at most the tail
   mass times the KL inside the tail).
2. ``--search-steps N`` (with ``--teacher``): the same 4-candidate search run twice, with and
   without the cache, side by side: wall time of each, the retrained losses and the rankings.

    .venv/bin/python benchmarks/teacher_cache.py --teacher runs/demo/teacher/checkpoints/... \
        --student runs/demo/pruned [--k 16,64,128] [--windows 16] [--search-steps 40 \
        --search-target 2700000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def kl_error(teacher: str, student: str, ks: list[int], windows: int, data: str | None) -> None:
    from nemo_minitron.checkpoint.io import load_checkpoint_tokenizer, load_model, load_model_config
    from nemo_minitron.config import DataConfig, ParallelConfig
    from nemo_minitron.data.datasets import build_gpt_datasets, sequences
    from nemo_minitron.data.embedded import prepare_embedded
    from nemo_minitron.distill.cache_kl import cached_forward_kl, vocab_parallel_topk
    from nemo_minitron.distill.losses import logit_divergence
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig())
    t_cfg = load_model_config(teacher)
    tok = load_checkpoint_tokenizer(teacher)
    prefix = data or prepare_embedded(DataConfig())[0]
    splits = build_gpt_datasets(prefix, tok, seq_length=t_cfg.seq_length, split="95,5,0",
                                seed=1234, num_samples=(1, windows, 0))
    tokens = sequences(splits.valid, windows)[:, :-1]
    models = [load_model(ckpt)[0] for ckpt in (teacher, student)]
    zt, zs = (forward_logits(m, tokens, micro_batch_size=4) for m in models)
    v = min(zt.shape[-1], zs.shape[-1])
    zt, zs = zt[..., :v].reshape(-1, v), zs[..., :v].reshape(-1, v)
    full = logit_divergence(zs, zt, chunk_tokens=512).double()
    print(f"forward KL(teacher || student) on {windows} x {t_cfg.seq_length} held-out tokens, "
          f"vocab {v}: full {full.mean():.5f}")
    print(f"  {'k':>6s} {'KL_k':>9s} {'rel. error':>10s} {'tail mass':>10s}")
    for k in ks:
        ids, logp, tail = vocab_parallel_topk(zt, k, None)
        approx = cached_forward_kl(zs, ids, logp, tail, chunk_tokens=512).double()
        err = (full.mean() - approx.mean()) / full.mean()
        print(f"  {k:6d} {approx.mean():9.5f} {err:10.2%} {tail.exp().double().mean():10.4f}")


def search_time(teacher: str, steps: int, recipe: str | None, target: int | None) -> None:
    """Two searches side by side (each in its own process), with and without the cache."""
    out = Path(tempfile.mkdtemp(prefix="nm-teacher-cache-"))
    results = {}
    try:
        for mode in ("live", "cache"):
            cmd = [sys.executable, "-m", "nemo_minitron", "search", teacher, str(out / mode)]
            cmd += [recipe] if recipe else []
            cmd += [f"search.target_params={target}"] if target else []
            cmd += ["search.max_candidates=4", f"search.retrain_steps={steps}",
                    f"search.teacher_cache={'true' if mode == 'cache' else 'false'}",
                    "kd.hidden_weight=0", "train.eval_interval=" + str(steps)]
            t0 = time.perf_counter()
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f"search ({mode}) failed: {run.stderr.strip()[-2000:]}")
            wall = time.perf_counter() - t0
            rows = json.loads((out / mode / "search" / "candidates.json").read_text())
            results[mode] = (wall, {r["name"]: r for r in rows["candidates"]})
        (tl, live), (tc, cached) = results["live"], results["cache"]
        print(f"search, 4 candidates x {steps} steps: live teacher {tl:.0f} s, cache {tc:.0f} s "
              f"(cache build included): {tl / tc:.2f}x")
        print(f"  {'candidate':24s} {'live loss':>10s} {'cache loss':>10s} {'rank':>5s} "
              f"{'rank':>5s}")
        for name, r in live.items():
            c = cached[name]
            print(f"  {name:24s} {r['retrained_loss']:10.4f} {c['retrained_loss']:10.4f} "
                  f"{r.get('rank_retrained', '-'):>5} {c.get('rank_retrained', '-'):>5}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher checkpoint")
    ap.add_argument("--student", help="student checkpoint (for the KL error table)")
    ap.add_argument("--k", default="16,64,128", help="cache sizes to compare")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows")
    ap.add_argument("--data", help="indexed-dataset prefix (default: the embedded corpus)")
    ap.add_argument("--search-steps", type=int, default=0,
                    help="also time a 4-candidate search with and without the cache")
    ap.add_argument("--search-recipe", help="search recipe (e.g. search.target_params there)")
    ap.add_argument("--search-target", type=int, help="search.target_params (parameters)")
    args = ap.parse_args()
    if args.student:
        kl_error(args.teacher, args.student, [int(k) for k in args.k.split(",")],
                 args.windows, args.data)
    if args.search_steps:
        search_time(args.teacher, args.search_steps, args.search_recipe, args.search_target)


if __name__ == "__main__":
    main()

"""Peak memory and throughput of ``merge`` (SLERP of two checkpoints, one process).

Builds two randomly initialised checkpoints of one shape (``--shape``), then merges them and
prints one JSON line: the peak memory of the merge as a ratio to the largest stored tensor
(goal: at most 3), the model's size as a multiple of that tensor (the measurement means
something only when it is large, >= 20), and the throughput in GB/s of weights read.

Peak memory is the growth of the process' peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the merge) over its resident size at that moment; glibc
is told to serve every allocation above 64 KiB with ``mmap`` so that freed tensors leave the
resident set at once (the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` set). A
tiny merge runs first so that one-time costs (lazy imports, first-call allocations, a few MiB)
stay out of the figure.

    .venv/bin/python benchmarks/merge_memory.py [--shape bench|test] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

SHAPES = {
    # fc1 (2 * 2048 x 1024 fp32, 16 MiB) is the largest tensor; 12 layers: ~28x.
    "bench": dict(num_layers=12, hidden_size=1024, ffn_hidden_size=2048,
                  num_attention_heads=16, num_query_groups=8, vocab_size=4096),
    # fc1 (2 * 1024 x 512 fp32, 4 MiB) is the largest tensor; 9 layers: ~22x.
    "test": dict(num_layers=9, hidden_size=512, ffn_hidden_size=1024, num_attention_heads=8,
                 num_query_groups=4, vocab_size=2048),
}
# Merged first, to leave one-time costs (lazy imports, first-call allocations) out of the peak.
WARMUP = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
              num_query_groups=2, vocab_size=256)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _make(path: Path, shape: dict, seed: int) -> None:
    from nemo_minitron.checkpoint.io import save_checkpoint
    from nemo_minitron.config import ModelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import set_seed

    cfg = ModelConfig(seq_length=128, **shape)
    set_seed(seed)
    model = build_model(cfg)
    save_checkpoint(path, model, model_cfg=cfg, tokenizer=None)
    del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="bench")
    ap.add_argument("--workdir", help="where the checkpoints go (default: a temp dir)")
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

    from nemo_minitron.checkpoint.layout import weights_dir
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.merge.config import MergeConfig
    from nemo_minitron.merge.run import merge_checkpoints
    from nemo_minitron.merge.store import CheckpointReader
    from nemo_minitron.parallel.runtime import init_distributed

    work = Path(args.workdir or tempfile.mkdtemp(prefix="merge-bench-"))
    try:
        init_distributed(ParallelConfig())
        for i, name in enumerate("ab"):
            _make(work / name, SHAPES[args.shape], seed=i + 1)
            _make(work / f"warmup_{name}", WARMUP, seed=i + 1)
        merge_checkpoints(work / "warmup_a", [str(work / "warmup_b")], work / "warmup",
                          MergeConfig(t=0.5))
        reader = CheckpointReader(weights_dir(work / "a"))
        layers = SHAPES[args.shape]["num_layers"]
        sizes = []
        for key, info in reader.tensors.items():
            n = info.dtype.itemsize
            for d in info.shape:
                n *= d
            stacked = key.startswith("decoder.layers.") and info.shape[0] == layers
            sizes += [n // layers] * layers if stacked else [n]
        largest, total = max(sizes), sum(sizes)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
        summary = merge_checkpoints(work / "a", [str(work / "b")], work / "merged",
                                    MergeConfig(t=0.5))
        peak = _status("VmHWM") - before
        print(json.dumps({
            "shape": args.shape, "largest_tensor_mib": round(largest / 2**20, 2),
            "model_mib": round(total / 2**20, 2), "model_over_largest": round(total / largest, 1),
            "peak_mib": round(peak / 2**20, 2), "peak_over_largest": round(peak / largest, 2),
            "read_gb_per_s": round(summary["bytes_read"] / summary["seconds"] / 1e9, 3),
        }))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

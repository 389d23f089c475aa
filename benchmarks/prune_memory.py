"""Peak host memory of ``prune`` per rank at TP=2: streaming one layer at a time (``nm.prune``)
against the old path that gathered the whole model on every rank.

Two processes (the script re-executes itself under ``torchrun --nproc-per-node 2``) build a
model of a few large layers (``--shape``) under TP=2 and prune it, both ways taking turns in
every repeat: ``prune_model`` (streaming), and the old path kept only here
(``gather_full_state_dict``, the per-layer slicing rules over the full state dict, a fresh
``build_model`` loaded from it). Each rank measures the growth of its peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` just before) over its resident size at that
moment, and divides it by its own shard of the source (bytes of its parameters). Printed as
one JSON line: per path, the median ratio over ranks and repeats with its range and spread
(``timing.stat``); the bound the streaming path should stay under, ``(new shard + one full
layer) / shard``; and whether both paths gave the same pruned weights (they must: exactly).
glibc serves allocations above 64 KiB with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so freed
tensors leave the resident set at once. A tiny prune runs first to keep one-time costs out.

    .venv/bin/python benchmarks/prune_memory.py [--shape bench|test] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from timing import stat

SHAPES = {
    # One full layer (fp32) 252 MiB; 4 layers: a 560 MiB shard per rank at TP=2.
    "bench": dict(num_layers=4, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=16,
                  num_query_groups=8, vocab_size=8192),
    # One full layer 15.8 MiB; 4 layers: a 36 MiB shard per rank at TP=2.
    "test": dict(num_layers=4, hidden_size=512, ffn_hidden_size=2048, num_attention_heads=8,
                 num_query_groups=4, vocab_size=2048),
}
WARMUP = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
              num_query_groups=2, vocab_size=256)
TP = 2


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak(fn):
    """``(fn(), growth of the peak resident set while it ran, in bytes)``."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    out = fn()
    return out, _status("VmHWM") - before


def _gather_path(model, plan):
    """The old ``prune_model``: the whole model on every rank, sliced, loaded into a new one."""
    from nemo_minitron.model import layouts
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.full_state import gather_full_state_dict, load_full_state_dict
    from nemo_minitron.prune.apply import prune_layer, prune_other

    full = gather_full_state_dict(model)
    layers: dict[int, dict] = defaultdict(dict)
    new = {}
    for key, w in full.items():
        parsed = layouts.split_layer_key(key)
        if parsed is None:
            new[key] = prune_other(key, w, plan)
        else:
            layers[parsed[0]][parsed[1]] = w
    for j, s in enumerate(plan.kept_layers):
        for name, t in prune_layer(layers[s], plan, s).items():
            new[layouts.layer_key(j, name)] = t
    pruned = build_model(plan.config)
    load_full_state_dict(pruned, new, plan.config)
    return pruned


def _setup(shape: dict):
    from nemo_minitron.config import ModelConfig
    from nemo_minitron.importance.baselines import random_scores
    from nemo_minitron.model.build import build_model
    from nemo_minitron.prune.plan import Target, make_plan

    cfg = ModelConfig(seq_length=128, **shape)
    model = build_model(cfg)
    target = Target(hidden_size=shape["hidden_size"] * 3 // 4,
                    ffn_hidden_size=shape["ffn_hidden_size"] // 2,
                    num_layers=shape["num_layers"] - 1 if shape["num_layers"] > 2 else None,
                    hardware_multiple=1)
    return model, make_plan(cfg, random_scores(cfg, 0), target, TP)


def _rank_main(shape_name: str, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.params import layer_params
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.prune.apply import prune_model

    init_distributed(ParallelConfig(tensor_model_parallel_size=TP))
    model, plan = _setup(WARMUP)
    prune_model(model, plan), _gather_path(model, plan)
    model, plan = _setup(SHAPES[shape_name])
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    bytes_per = next(model.parameters()).element_size()
    full_layer = layer_params(plan.source) * bytes_per
    streamed, gathered = [], []
    same = True
    for _ in range(repeats):
        a, peak_a = _peak(lambda: prune_model(model, plan))
        new_shard = sum(p.numel() * p.element_size() for p in a.parameters())
        sd_a = {k: v.clone() for k, v in a.state_dict().items() if not k.endswith("_extra_state")}
        del a
        b, peak_b = _peak(lambda: _gather_path(model, plan))
        same &= all(torch.equal(v, b.state_dict()[k]) for k, v in sd_a.items())
        del b, sd_a
        streamed.append(peak_a / shard)
        gathered.append(peak_b / shard)
    mine = {"streamed": streamed, "gathered": gathered, "same": same,
            "bound": (new_shard + full_layer) / shard, "shard_mib": shard / 2**20,
            "layer_mib": full_layer / 2**20}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        s = stat([x for r in every for x in r["streamed"]])
        g = stat([x for r in every for x in r["gathered"]])
        print(json.dumps({
            "shape": shape_name, "tp": TP, "repeats": repeats,
            "shard_mib": round(max(r["shard_mib"] for r in every), 2),
            "full_layer_mib": round(every[0]["layer_mib"], 2),
            "streaming_peak_over_shard": s.fmt(), "gather_peak_over_shard": g.fmt(),
            "streaming_median": round(s.median, 3), "gather_median": round(g.median, 3),
            "streaming_bound_new_shard_plus_layer": round(max(r["bound"] for r in every), 3),
            "gather_over_streaming": round(g.median / s.median, 2),
            "same_weights": all(r["same"] for r in every)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="bench")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if "RANK" in os.environ:
        _rank_main(args.shape, args.repeats)
        return
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    os.execve(torchrun, [torchrun, "--standalone", f"--nproc-per-node={TP}", __file__,
                         *sys.argv[1:]], env)


if __name__ == "__main__":
    main()

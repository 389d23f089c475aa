"""Cost of the CPU backend's device-rewriting mode (``parallel.cpu``), measured side by side.

1. Forward + backward of the same small Megatron ``GPTModel`` (TP=1, PP=1, built once) with
   the backend as ``init_distributed`` enters it (device mode on for the whole process) vs
   scoped as narrowly as it can be: the mode left out while the model runs. Built on the CPU,
   the model's forward and backward name a CUDA device only for Megatron's default causal
   mask, so both variants pass that mask explicitly (the pipeline schedules and the optimizer
   are the parts that still need the mode).
2. Per-call overhead of the mode on a loop of plain torch ops (``a + b`` on small tensors),
   with the mode vs without, in microseconds per call.

Times are the minimum over ``--repeats`` runs, after one warm-up run.

    .venv/bin/python benchmarks/cpu_backend.py [--repeats 5 --ops 20000]
        [--layers 4 --hidden 256 --seq 256 --batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ops", type=int, default=20000, help="plain torch ops per timing")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()

    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel import cpu
    from nemo_minitron.parallel.runtime import init_distributed, shutdown

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    init_distributed(ParallelConfig(), seed=0)  # enters the backend, mode included
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                      ffn_hidden_size=3 * args.hidden, num_attention_heads=8,
                      num_query_groups=4, seq_length=args.seq, vocab_size=4096)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4096, (args.batch, args.seq), generator=g)
    pos = torch.arange(args.seq).unsqueeze(0).expand(args.batch, -1)
    causal = torch.ones(1, 1, args.seq, args.seq).triu(1).bool()  # True: masked out

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        loss = model(tokens, pos, causal, labels=tokens).float().mean()
        loss.backward()

    a, b = torch.ones(8), torch.ones(8)

    def ops() -> None:
        for _ in range(args.ops):
            a + b

    result = {"model": {"num_layers": args.layers, "hidden_size": args.hidden,
                        "seq_length": args.seq, "micro_batch_size": args.batch}}
    result["fwd_bwd_s_mode_on"] = _best(fwd_bwd, args.repeats)
    result["op_us_mode_on"] = 1e6 * _best(ops, args.repeats) / args.ops
    cpu.exit()
    with cpu.backend(rewrite_devices=False):  # the narrowest scope: no mode while it runs
        result["fwd_bwd_s_scoped"] = _best(fwd_bwd, args.repeats)
        result["op_us_mode_off"] = 1e6 * _best(ops, args.repeats) / args.ops
    result["fwd_bwd_ratio_mode_on_vs_scoped"] = (result["fwd_bwd_s_mode_on"]
                                                 / result["fwd_bwd_s_scoped"])
    result["op_overhead_us"] = result["op_us_mode_on"] - result["op_us_mode_off"]
    cpu.enter()  # shutdown leaves it
    shutdown()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Cost of the importance pass: activation-importance estimation (forward with hooks) as a
ratio to a plain forward pass of the same tokens, interleaved repeats (goal: at most 1.15).

Each (shape, TP) runs in its own ``torchrun`` job (one process per TP rank, a thread each on a
2-core machine at TP=2) so parallel state never leaks between them.

    .venv/bin/python benchmarks/importance_cost.py [--shapes demo,wide] [--tp 1,2]
        [--repeats 5] [--tokens 32x256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved, ratios, stat  # noqa: E402

DEMO = dict(num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8,
            num_query_groups=4, seq_length=256, vocab_size=4096)
WIDE = dict(DEMO, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16,
            num_query_groups=8)
SHAPES = {"demo": DEMO, "wide": WIDE}


def child(shape: str, tp: int, repeats: int, batch: int, seq: int) -> None:
    """One (shape, TP) job: rank 0 prints the per-repeat seconds as JSON."""
    import torch

    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.importance.estimator import estimate_importance
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_pass
    from nemo_minitron.parallel.runtime import init_distributed, shutdown

    if tp > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // tp))
    rt = init_distributed(ParallelConfig(tensor_model_parallel_size=tp))
    cfg = ModelConfig(**dict(SHAPES[shape], seq_length=seq))
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq),
                           generator=torch.Generator().manual_seed(0))
    mbs = min(8, batch)
    runs = {
        "importance": lambda: estimate_importance(model, tokens, micro_batch_size=mbs),
        "forward": lambda: forward_pass(model, tokens, micro_batch_size=mbs),
    }
    times = interleaved(runs, repeats)
    if rt.rank == 0:
        print(json.dumps(times))
    shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="demo,wide", help="demo (L4-H256-F768), wide "
                    "(L4-H1024-F4096)")
    ap.add_argument("--tp", default="1,2", help="tensor-parallel sizes to measure")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (after a warm-up)")
    ap.add_argument("--tokens", default="32x256", help="BATCHxSEQ calibration tokens")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    batch, seq = (int(x) for x in args.tokens.split("x"))
    if args.child:
        child(args.child[0], int(args.child[1]), args.repeats, batch, seq)
        return
    print(f"importance pass / plain forward, {batch} x {seq} tokens, {args.repeats} "
          "interleaved repeats (goal <= 1.15):")
    for shape in args.shapes.split(","):
        for tp in (int(x) for x in args.tp.split(",")):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp),
                   "--master-port", str(29700 + tp), __file__, "--child", shape, str(tp),
                   "--repeats", str(args.repeats), "--tokens", args.tokens]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"error: {shape} TP={tp} failed:\n{out.stderr[-2000:]}")
            line = [x for x in out.stdout.splitlines() if x.startswith("{")][-1]
            t = json.loads(line)
            r = stat(ratios(t["importance"], t["forward"]))
            print(f"  {shape:5s} TP={tp}: forward {stat(t['forward']).fmt(' ms', 1000, 1)}")
            print(f"  {'':5s}       ratio {r.fmt()}")


if __name__ == "__main__":
    main()

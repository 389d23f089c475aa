"""Distillation overheads, measured side by side in one run (ratios, not absolute times).

1. Step time: a distillation step (teacher forward + student forward/backward + KL) as a ratio
   to a plain student training step plus a teacher forward on the same micro-batches, through
   Megatron's schedule (goal: at most 1.10).
2. Peak memory of the logit loss (forward + backward) on a ``tokens x vocab`` problem as a ratio
   to the size of the student logits tensor, chunked and unchunked, beside a textbook
   ``log_softmax`` + ``kl_div`` (goal: at most 1.5 with chunking). The loss' own output, the
   logits' gradient, counts. Each variant runs in a fresh process; the peak is the growth of the
   process' peak resident set size (reset once the inputs exist).

    .venv/bin/python benchmarks/kd_efficiency.py [--tokens 4096 --vocab 32000 --repeats 5]
        [--shapes demo,wide] [--chunks 32,128,512,auto,none]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved, ratios, stat  # noqa: E402

DEMO = dict(num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8,
            num_query_groups=4, seq_length=256, vocab_size=4096)
# Wider layers, same vocabulary: the logit loss' share of a step shrinks as the layers grow (at
# Llama scale the vocabulary is 32x larger but each layer ~256x).
WIDE = dict(DEMO, hidden_size=1024, ffn_hidden_size=3072, num_attention_heads=16,
            num_query_groups=8)
SHAPES = {
    "demo": (DEMO, dict(DEMO, num_layers=3, hidden_size=192, ffn_hidden_size=384,
                        kv_channels=32)),
    "wide": (WIDE, dict(WIDE, hidden_size=768, ffn_hidden_size=2048, kv_channels=64)),
}


def _maxrss_bytes() -> int:
    """Peak resident set size (VmHWM) since the last ``_reset_peak``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> None:
    """Reset the peak to the current resident size (Linux), so transients of building the
    inputs (which depend on the environment, e.g. thread counts) do not hide the loss' peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory_child(variant: str, tokens: int, vocab: int) -> None:
    """Print the loss' peak memory growth over the student logits' size, as JSON."""
    import torch.nn.functional as F

    from nemo_minitron.distill.losses import logit_divergence

    g = torch.Generator().manual_seed(0)
    student = torch.randn(tokens, vocab, generator=g).requires_grad_(True)
    teacher = torch.randn(tokens, vocab, generator=g)
    _reset_peak()
    base = _maxrss_bytes()  # the logits exist; what the loss adds (gradient included) counts
    if variant == "textbook":
        loss = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1),
                        log_target=True, reduction="none").sum(-1).mean()
    else:
        chunk = _chunk_arg(variant.split("=")[1]) if "=" in variant else None
        loss = logit_divergence(student, teacher, chunk_tokens=chunk).mean()
    loss.backward()
    peak = _maxrss_bytes() - base
    print(json.dumps({"variant": variant, "ratio": peak / (student.numel() * 4)}))


def _chunk_arg(text: str) -> int | str | None:
    return None if text == "none" else text if text == "auto" else int(text)


def loss_times(tokens: int, vocab: int, chunks: list[str], repeats: int
               ) -> dict[str, list[float]]:
    """Seconds of one forward+backward of the logit loss per chunk size, interleaved."""
    from nemo_minitron.distill.losses import logit_divergence

    g = torch.Generator().manual_seed(0)
    student = torch.randn(tokens, vocab, generator=g).requires_grad_(True)
    teacher = torch.randn(tokens, vocab, generator=g)

    def run(chunk) -> None:
        student.grad = None
        logit_divergence(student, teacher, chunk_tokens=chunk).mean().backward()

    return interleaved({f"chunk={c}": partial(run, _chunk_arg(c)) for c in chunks}, repeats)


def step_times(shape: str, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, interleaved within every repeat."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.distill.objective import KDConfig, KDObjective
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_pass
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.train.objectives import LMObjective

    rt = init_distributed(ParallelConfig())
    t_cfg, s_cfg = SHAPES[shape]
    teacher, student = build_model(ModelConfig(**t_cfg)), build_model(ModelConfig(**s_cfg))
    mbs, n_micro, s = 4, 2, t_cfg["seq_length"]
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 4000, (mbs * n_micro, s + 1), generator=g)
    batches = [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(mbs, s),
                "position_ids": torch.arange(s).expand(mbs, s)} for t in toks.split(mbs)]
    fwd_bwd = get_forward_backward_func()
    kd = KDObjective(teacher, student, KDConfig(), rt.device, pairs=[], num_microbatches=n_micro)
    lm = LMObjective(rt.device)

    def train(objective) -> None:
        student.zero_grad()
        fwd_bwd(forward_step_func=objective.forward_step, data_iterator=iter(batches),
                model=[student], num_microbatches=n_micro, seq_length=s, micro_batch_size=mbs,
                forward_only=False)

    runs = {"kd step": partial(train, kd), "student step": partial(train, lm),
            "teacher forward": partial(forward_pass, teacher, toks[:, :-1], micro_batch_size=mbs)}
    return interleaved(runs, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (after a warm-up)")
    ap.add_argument("--shapes", default="demo,wide", help="step-time models: demo, wide")
    ap.add_argument("--chunks", default="",
                    help="also time the loss alone at --tokens x --vocab for these chunk sizes "
                         "(comma list of N, auto, none), e.g. 32,128,512,auto,none")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        memory_child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    if args.chunks:
        t = loss_times(args.tokens, args.vocab, args.chunks.split(","), args.repeats)
        print(f"logit loss forward+backward, {args.tokens} x {args.vocab} fp32, "
              f"{torch.get_num_threads()} threads ({args.repeats} interleaved repeats):")
        for k, v in t.items():
            print(f"  {k:12s} {stat(v).fmt(' ms', 1000, 1)}")
    for shape in filter(None, args.shapes.split(",")):
        t_cfg, s_cfg = SHAPES[shape]
        t = step_times(shape, args.repeats)
        r = stat(ratios(t["kd step"], [a + b for a, b in zip(t["student step"],
                                                            t["teacher forward"])]))
        print(f"step time, {shape} ({args.repeats} interleaved repeats, teacher "
              f"{t_cfg['num_layers']}x{t_cfg['hidden_size']}, student {s_cfg['num_layers']}x"
              f"{s_cfg['hidden_size']}, vocab {t_cfg['vocab_size']}, 8 x {t_cfg['seq_length']} "
              "tokens):")
        for k, v in t.items():
            print(f"  {k:16s} {stat(v).fmt(' ms', 1000, 1)}")
        print(f"  kd step / (student step + teacher forward): {r.fmt()}  (goal <= 1.10)")
    print(f"logit-loss peak memory / student logits ({args.tokens} x {args.vocab} fp32):")
    for variant in ("chunk=auto", "chunk=256", "chunk=1024", "unchunked", "textbook"):
        # A fixed mmap threshold makes glibc return every large free to the OS at once, so the
        # peak resident size is the peak of live buffers, not of the allocator's caching.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, __file__, "--child", variant, str(args.tokens),
                              str(args.vocab)], capture_output=True, text=True, check=True,
                             env=env)
        mem = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {variant:12s} {mem['ratio']:.2f}" + ("  (goal <= 1.5)" if variant == "chunk=auto"
                                                     else ""))


if __name__ == "__main__":
    main()

"""Where a decode step's time goes, teacher beside pruned model: the whole step, its matrix
products alone and its attention over the KV cache alone, each timed in turns with the others
(interleaved repeats), as ratios teacher / pruned with their spread.

``nemo-minitron bench`` reports the decode speed-up as a share of the FLOP ratio. This splits
that share: the products alone (the same weights, the same decode-shaped inputs, nothing else)
give the share the GEMMs reach by themselves; the attention over the cache reads the same
bytes in both models when heads, groups and kv_channels are kept (width pruning of hidden and
FFN sizes), so it is a constant, like the per-layer rest (norms, RoPE, cache writes, residual
adds, Megatron's Python) that the step time minus both leaves. The byte ratio (weights plus
the KV cache read per step) is the ceiling of a memory-bound decode step.

    .venv/bin/python benchmarks/decode_bound.py TEACHER PRUNED [--batch 8] [--prompt 128]
        [--decode-tokens 32] [--repeats 6]

Like the decoding verbs, it runs with ``OMP_WAIT_POLICY=ACTIVE`` unless the environment names a
policy (``utils.omp``; ``OMP_WAIT_POLICY=PASSIVE`` to see the difference). The last line printed
is the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved, ratios, stat  # noqa: E402


def decode_weights(model) -> list:
    """The weights a decode step multiplies by: every 2-D parameter of the layers and the
    output layer (the tied embedding when the output layer has none); the embedding lookup
    reads one row per token and is left out, as in ``eval.bench.flops_per_token``."""
    ws = [p.detach() for n, p in model.named_parameters()
          if p.dim() == 2 and "word_embeddings" not in n]  # an untied output layer is one
    if model.output_layer.weight is None:  # tied: it multiplies by the embedding
        ws.append(model.shared_embedding_or_output_weight().detach())
    return ws


def runs_of(model, cfg, prompt, decode_tokens: int) -> dict:
    """Three callables for one model: its decode run, the products, the attention."""
    import torch
    import torch.nn.functional as F

    from nemo_minitron.eval.bench import prefill_decode_seconds
    from nemo_minitron.parallel.cpu import device_rewrites_paused

    b, s = prompt.shape
    weights = decode_weights(model)
    xs = {k: torch.randn(b, k) for k in {w.shape[1] for w in weights}}
    d, heads, groups = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    # Megatron's static cache layout, [context, batch, groups, kv_channels], read as views.
    cache = torch.randn(2, s + decode_tokens, b, groups, d)
    q = torch.randn(b, heads, 1, d)

    def step() -> float:
        return prefill_decode_seconds(model, prompt, decode_tokens)[1]

    # Both run as a decode step does: without autograd and with the CPU backend's device mode
    # paused (it would charge every call).
    @torch.no_grad()
    @device_rewrites_paused()
    def products() -> None:
        for _ in range(decode_tokens):
            for w in weights:
                torch.matmul(xs[w.shape[1]], w.t())

    @torch.no_grad()
    @device_rewrites_paused()
    def attention() -> None:
        for i in range(decode_tokens):
            k, v = (c[:s + i + 1].permute(1, 2, 0, 3) for c in cache)
            for _ in range(cfg.num_layers):
                F.scaled_dot_product_attention(q, k, v, enable_gqa=groups != heads)

    return {"step": step, "products": products, "attention": attention,
            "weight_bytes": sum(w.numel() * w.element_size() for w in weights),
            "kv_bytes": 2 * cfg.num_layers * b * groups * d * cache.element_size()
            * sum(s + i + 1 for i in range(decode_tokens)) // decode_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("teacher", help="checkpoint of the reference (unpruned) model")
    ap.add_argument("pruned", help="checkpoint of the pruned model")
    ap.add_argument("--batch", type=int, default=8, help="sequences per batch")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--decode-tokens", type=int, default=32, help="decode steps per run")
    ap.add_argument("--repeats", type=int, default=6, help="timed repeats (after a warm-up)")
    args = ap.parse_args()
    from nemo_minitron.utils.omp import prefer_spinning_threads

    prefer_spinning_threads()  # as the decoding verbs do (utils.omp); before torch loads

    import torch

    from nemo_minitron.checkpoint.io import load_model
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.eval.bench import flops_per_token
    from nemo_minitron.parallel.runtime import init_distributed, shutdown

    init_distributed(ParallelConfig())
    models = {}
    for name, ckpt in (("teacher", args.teacher), ("pruned", args.pruned)):
        model, cfg, _ = load_model(ckpt, attention="sdpa")
        model.eval()
        prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt),
                               generator=torch.Generator().manual_seed(0))
        models[name] = (cfg, runs_of(model, cfg, prompt, args.decode_tokens))
    n = args.decode_tokens
    timed = {f"{name}.{part}": r[part] for name, (_, r) in models.items()
             for part in ("step", "products", "attention")}
    # A step's own clock covers the decode loop only (its prefill is not timed).
    times = interleaved(timed, args.repeats, own_clock=frozenset({"teacher.step",
                                                                   "pruned.step"}))
    flop = (flops_per_token(models["teacher"][0], args.prompt + n / 2)
            / flops_per_token(models["pruned"][0], args.prompt + n / 2))
    bytes_ratio = ((models["teacher"][1]["weight_bytes"] + models["teacher"][1]["kv_bytes"])
                   / (models["pruned"][1]["weight_bytes"] + models["pruned"][1]["kv_bytes"]))
    print(f"decode, batch {args.batch}, prompt {args.prompt}, {n} steps, {args.repeats} "
          f"interleaved repeats; FLOP ratio {flop:.3f}, bytes-read ratio {bytes_ratio:.3f} "
          f"(ceiling of a memory-bound step: share {bytes_ratio / flop:.2f})")
    result = {"flop_ratio": flop, "bytes_ratio": bytes_ratio}
    for part in ("step", "products", "attention"):
        t, p = stat(times[f"teacher.{part}"]), stat(times[f"pruned.{part}"])
        r = stat(ratios(times[f"teacher.{part}"], times[f"pruned.{part}"]))
        # Attention reads the same cache in both when heads and groups are kept: no share.
        share = "" if part == "attention" else f"; share {r.median / flop:.2f}"
        print(f"  {part:9s} teacher {t.median / n * 1e3:6.1f} ms/step, pruned "
              f"{p.median / n * 1e3:6.1f} ms/step; speed-up {r.fmt()}{share}")
        result[part] = {"teacher_ms": t.median / n * 1e3, "pruned_ms": p.median / n * 1e3,
                        "ratio": r.median, "ratio_lo": r.lo, "ratio_hi": r.hi,
                        "share": r.median / flop}
    rest = {k: result["step"][f"{k}_ms"] - result["products"][f"{k}_ms"]
            - result["attention"][f"{k}_ms"] for k in ("teacher", "pruned")}
    print(f"  rest      teacher {rest['teacher']:6.1f} ms/step, pruned {rest['pruned']:6.1f} "
          "ms/step (step minus products minus attention: norms, RoPE, cache writes, Python)")
    result["rest_ms"] = rest
    result["weight_bytes"] = {k: v[1]["weight_bytes"] for k, v in models.items()}
    print(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main()

"""``bench``: prefill and decode throughput of checkpoints side by side, with the ratio to the
first checkpoint and the ratio predicted from forward FLOPs.

Prefill: one forward of ``batch x seq`` prompt tokens filling Megatron's KV cache; decode:
``decode_tokens`` single-token steps per sequence attending to that cache (the generator's
path), timed apart from the prefill. ``attention`` picks the local spec's core attention
(``sdpa`` reads grouped keys/values of the cache in place; Megatron's local attention copies the
whole cache per step and layer to repeat them for GQA).

The checkpoints take turns within every repeat (all loaded at once; ``interleave=False``, the
CLI's ``--sequential``, loads one at a time for models that do not fit together), after one
warm-up round. Per repeat, each checkpoint's time is divided into the first checkpoint's: the
table shows the median of these ratios with their range, and tokens/s as medians. A ratio of
two timings taken minutes apart (one model after the other) is hostage to whatever the machine
did in between: on a quiet 2-core machine the width student's decode share read 0.73 and 0.93
in two such runs minutes apart. FLOPs per token are
``2 x (parameters touched per token) + 4 x layers x context x heads x kv_channels`` (the
attention scores and the weighted sum), taken at the mean context length of each phase. The
table's ``share`` is the measured speed-up over the FLOP-predicted one (1: the pruning's FLOP
saving fully turned into speed).

Why decode fell short of the FLOP ratio after width pruning (``--profile`` shows it per
checkpoint): Megatron's static-batching KV cache stores keys before RoPE, so every decode step
re-applied RoPE to the whole cached key tensor in every layer, a cost that does not shrink when
hidden or FFN sizes are pruned. The local spec's ``RopeCachedSelfAttention``
(``model/attention.py``) caches keys with RoPE applied instead. Megatron's local core attention
still copies the cache to repeat key/value groups for GQA (SDPA does not). The rest is a
per-layer constant that width pruning keeps, as it keeps every layer. On CPU it was about 1 ms
per layer and decode step outside matrix products. It came from Megatron's Python, some 120
torch calls per layer, each also paying the CPU backend's device mode. Three changes cut it:

- the local spec's linear layers skip Megatron's autograd ``Function`` without autograd on one
  rank (``model/linear.py``);
- one-rank decode steps run with the device mode paused (``model/gpt.py``);
- RoPE skips its ``Function`` and computes cos/sin once per layer.

Together they took SmolLM2-135M's decode from 98 to 118 tokens/s, and its width-pruned
student's (hidden 576->448, FFN 1536->960) from 129 to 168. What remained for that pair, per
decode step at batch 8 on 2 cores, was the same for both models: SDPA over the cache (2-3 ms,
memory-bound; ``torch.profiler`` read 4.5), other small operators and Megatron's Python, some
20 ms of the student's 50 by the profiler. The matrix products fell short too, not
because small matrices stream slower (run alone they reach the FLOP ratio) but because libgomp's
threads slept in the gaps between them: the decoding verbs now start OpenMP with
``OMP_WAIT_POLICY=ACTIVE`` (``utils/omp.py``), which took the student's decode to 184-201
tokens/s and its share to 0.87-0.96. ``benchmarks/decode_bound.py`` times these parts side by
side: the whole step, its products alone on the model's own weights, its attention over the
cache alone, and the rest (10-16 ms per step, the same for both models).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from nemo_minitron.config import ConfigError, ModelConfig, ParallelConfig


@dataclass(kw_only=True)
class BenchConfig:
    """Sizes of the measurement."""

    batch_size: int = 8
    """Sequences per batch."""
    seq_length: int = 128
    """Prompt tokens per sequence (prefill)."""
    decode_tokens: int = 32
    """Generated tokens per sequence (decode)."""
    repeats: int = 3
    """Timed rounds after one warm-up round (each round: one prefill and the decode after it,
    per checkpoint; ratios are formed per round, their median reported)."""
    attention: str | None = None
    """Core attention of the local spec (``local`` or ``sdpa``; None: the build default)."""
    interleave: bool = True
    """Time the checkpoints in turns within every repeat, all loaded at once (False: one after
    another, one model in memory at a time)."""

    def __post_init__(self) -> None:
        from nemo_minitron.model.build import check_attention

        for name in ("batch_size", "seq_length", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag}={getattr(self, name)} must be >= 1")
        if self.attention is not None:
            check_attention(self.attention)


def flops_per_token(cfg: ModelConfig, context: float) -> float:
    """Forward FLOPs of one token attending to ``context`` tokens (embedding lookup free)."""
    assert cfg.vocab_size is not None
    return (sum(layer_flops(cfg, i, context) for i in range(cfg.num_layers))
            + 2 * cfg.vocab_size * cfg.hidden_size)


def layer_flops(cfg: ModelConfig, layer: int, context: float) -> float:
    """Forward FLOPs of one token in layer ``layer``: its matmuls (an MoE layer's are those of
    the experts a token is routed to: active parameters; a heterogeneous layer's its own) and,
    for a full attention block, the scores and weighted sum over ``context`` tokens."""
    from nemo_minitron.model.params import per_layer_params

    attends = cfg.layer_shape(layer).attention == "full"
    return (2 * per_layer_params(cfg, active=True)[layer]
            + (4 * context * cfg.num_attention_heads * cfg.head_dim if attends else 0))


def layer_table(cfg: ModelConfig, context: float) -> str:
    """A Markdown table of a model's layers: their shapes, parameters and forward FLOPs per
    token at ``context`` (``layer_flops``)."""
    from nemo_minitron.eval.table import markdown_table
    from nemo_minitron.model.params import per_layer_params

    def block(kind: str, size: int | None) -> str:
        return f"full {size}" if kind == "full" else kind

    cells = []
    for i, params in enumerate(per_layer_params(cfg)):
        s = cfg.layer_shape(i)
        cells.append([str(i), block(s.attention, s.num_query_groups),
                      block(s.mlp, s.ffn_hidden_size), f"{params / 1e6:.3f}M",
                      f"{layer_flops(cfg, i, context) / 1e6:.3f}M"])
    return markdown_table(["layer", "attention (query groups)", "MLP (ffn_hidden_size)",
                           "params", "FLOPs/token"], cells)


def decode_seconds(model: torch.nn.Module, prompt: torch.Tensor, decode_tokens: int) -> float:
    """Seconds of ``decode_tokens`` single-token greedy steps per sequence attending to the KV
    cache of ``prompt`` (``batch x seq``; its prefill is not timed)."""
    return prefill_decode_seconds(model, prompt, decode_tokens)[1]


@torch.no_grad()
def prefill_decode_seconds(model: torch.nn.Module, prompt: torch.Tensor,
                           decode_tokens: int) -> tuple[float, float]:
    """Seconds of the prefill of ``prompt`` (``batch x seq``) into a KV cache, and of the
    ``decode_tokens`` single-token greedy steps per sequence that follow it, timed apart."""
    from nemo_minitron.eval.decode import KVCache, decode_steps, sync

    b, s = prompt.shape
    tokens = torch.cat([prompt, prompt.new_zeros(b, decode_tokens + 1)], 1)
    steps = decode_steps(KVCache(model, b, s + decode_tokens), tokens, s, s + decode_tokens + 1)
    sync()
    t0 = time.perf_counter()
    for pos, logits in steps:  # the first step is the prefill, the rest single-token steps
        tokens[:, pos] = logits.argmax(-1)
        if pos == s:
            sync()
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
    sync()
    return prefill, time.perf_counter() - t0


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
"""Matrix products: the part of a step that scales with the FLOPs pruning removes."""


@torch.no_grad()
def profile_decode(model: torch.nn.Module, prompt: torch.Tensor, decode_tokens: int,
                   top: int = 6) -> dict[str, Any]:
    """Self CPU time of one decode run by operator: the GEMM share and the ``top`` operators
    (name, share), from ``torch.profiler`` (not timed: the profiler slows every op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        decode_seconds(model, prompt, decode_tokens)
    ops = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in ops) or 1.0
    ops.sort(key=lambda kv: -kv[1])
    return {"gemm_share": sum(t for k, t in ops if k in GEMM_OPS) / total,
            "top_ops": [(k, t / total) for k, t in ops[:top]]}


@dataclass
class _Loaded:
    """One checkpoint's model, ready to time."""

    checkpoint: str
    model: torch.nn.Module
    cfg: ModelConfig
    prompt: torch.Tensor

    def time_once(self, decode_tokens: int) -> tuple[float, float]:
        """Seconds of one prefill and of the decode run that follows it."""
        return prefill_decode_seconds(self.model, self.prompt, decode_tokens)


def _load(checkpoint: str, b: BenchConfig) -> _Loaded:
    from nemo_minitron.checkpoint.io import load_model

    model, cfg, _ = load_model(checkpoint, bf16=torch.cuda.is_available(), attention=b.attention)
    model.eval()
    assert cfg.vocab_size is not None
    prompt = torch.randint(0, cfg.vocab_size, (b.batch_size, b.seq_length),
                           generator=torch.Generator().manual_seed(0))
    return _Loaded(checkpoint, model, cfg, prompt.to(next(model.parameters()).device))


def _rounds(loaded: list[_Loaded], b: BenchConfig) -> list[list[tuple[float, float]]]:
    """Per model, ``(prefill, decode)`` seconds of ``b.repeats`` rounds after a warm-up round;
    in each round the models take turns."""
    for x in loaded:  # warm-up round
        x.time_once(b.decode_tokens)
    times: list[list[tuple[float, float]]] = [[] for _ in loaded]
    for _ in range(b.repeats):
        for i, x in enumerate(loaded):
            times[i].append(x.time_once(b.decode_tokens))
    return times


def _row(x: _Loaded, times: list[tuple[float, float]], b: BenchConfig,
         profile: bool) -> dict[str, Any]:
    from nemo_minitron.model.params import count_params

    return {
        **(profile_decode(x.model, x.prompt, b.decode_tokens) if profile else {}),
        "checkpoint": x.checkpoint, "params": count_params(x.cfg),
        "active_params": count_params(x.cfg, active=True), "times": times,
        "prefill_tok_s": b.batch_size * b.seq_length / statistics.median(t for t, _ in times),
        "decode_tok_s": b.batch_size * b.decode_tokens / statistics.median(t for _, t in times),
        "prefill_flops_tok": flops_per_token(x.cfg, b.seq_length / 2),
        "decode_flops_tok": flops_per_token(x.cfg, b.seq_length + b.decode_tokens / 2),
        # A heterogeneous model's layers, FLOPs at the decode context.
        **({"layers": layer_table(x.cfg, b.seq_length + b.decode_tokens / 2)}
           if x.cfg.is_heterogeneous else {}),
    }


def bench(checkpoints: list[str], b: BenchConfig, profile: bool = False
          ) -> list[dict[str, Any]]:
    """A row per checkpoint: median tokens/s, and against the first checkpoint the median of the
    per-repeat speed ratios (``*_ratio``, range ``*_ratio_lo``/``*_ratio_hi``), the ratio
    predicted from FLOPs (a model with half the FLOPs per token is predicted to run twice as
    fast) and their quotient, the share of the FLOP ratio achieved; ``profile`` adds
    ``profile_decode``'s breakdown."""
    from nemo_minitron.checkpoint.io import check_checkpoint
    from nemo_minitron.parallel.runtime import init_distributed

    for c in checkpoints:
        check_checkpoint(c)
    init_distributed(ParallelConfig())
    if b.interleave:
        loaded = [_load(c, b) for c in checkpoints]
        rows = [_row(x, t, b, profile) for x, t in zip(loaded, _rounds(loaded, b))]
    else:
        rows = []
        for c in checkpoints:
            x = _load(c, b)
            rows.append(_row(x, _rounds([x], b)[0], b, profile))
            del x  # one model in memory at a time
    ref = rows[0]
    for r in rows:
        for k, phase in enumerate(("prefill", "decode")):
            per = [a[k] / t[k] for a, t in zip(ref["times"], r["times"])]  # speed ratios
            r[f"{phase}_ratio"] = statistics.median(per)
            r[f"{phase}_ratio_lo"], r[f"{phase}_ratio_hi"] = min(per), max(per)
            r[f"{phase}_flop_ratio"] = ref[f"{phase}_flops_tok"] / r[f"{phase}_flops_tok"]
            r[f"{phase}_share"] = r[f"{phase}_ratio"] / r[f"{phase}_flop_ratio"]
    return rows


def bench_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows (tokens/s: medians; ratio: median of the per-repeat ratios
    to the first checkpoint, with their range; share: ratio / FLOP ratio), then the decode
    profile of each row that has one."""
    from nemo_minitron.eval.table import markdown_table

    header = ["checkpoint", "params", "prefill tok/s", "ratio (range)", "FLOP ratio", "share",
              "decode tok/s", "ratio (range)", "FLOP ratio", "share"]
    cells = []
    for r in rows:
        active = r.get("active_params", r["params"])  # MoE: the experts one token runs
        row = [r["checkpoint"], f"{r['params'] / 1e6:.2f}M" + (
            f" ({active / 1e6:.2f}M active)" if active != r["params"] else "")]
        for phase in ("prefill", "decode"):
            row += [f"{r[phase + '_tok_s']:.0f}",
                    f"{r[phase + '_ratio']:.2f} ({r[phase + '_ratio_lo']:.2f}-"
                    f"{r[phase + '_ratio_hi']:.2f})",
                    f"{r[phase + '_flop_ratio']:.2f}", f"{r[phase + '_share']:.2f}"]
        cells.append(row)
    lines = [markdown_table(header, cells, text_columns={0})]
    for r in rows:
        if "layers" in r:
            lines.append(f"\nlayers of {r['checkpoint']} (FLOPs at the decode context):\n"
                         f"{r['layers']}")
        if "gemm_share" in r:
            top = ", ".join(f"{k} {v:.0%}" for k, v in r["top_ops"])
            lines.append(f"\ndecode profile of {r['checkpoint']}: matrix products "
                         f"{r['gemm_share']:.0%} of operator time; top: {top}")
    return "\n".join(lines)

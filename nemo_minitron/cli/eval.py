"""Evaluation verbs: ``eval`` (perplexity), ``generate``, ``lm-eval``, ``bench`` (throughput)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nemo_minitron.cli.common import sampling_args, sampling_config, sampling_values
from nemo_minitron.config import ConfigError
from nemo_minitron.utils.rank import is_rank0


def cmd_eval(args: argparse.Namespace) -> int:
    from nemo_minitron.eval.perplexity import PerplexityConfig, perplexity
    from nemo_minitron.interop.hf_import import parse_import_overrides

    # A positional argument holding '=' is a parallel.* override, the others are files.
    overrides = [a for a in args.files if "=" in a and not Path(a).exists()]
    files = [a for a in args.files if a not in overrides]
    parallel, _ = parse_import_overrides(overrides)
    cfg = PerplexityConfig(data_path=args.data, seq_length=args.seq_length,
                           max_windows=args.max_windows, micro_batch_size=args.micro_batch_size)
    result = perplexity(args.checkpoint, cfg, files, parallel)
    if is_rank0():
        print(json.dumps(result))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from nemo_minitron.eval.generate import SamplingConfig, generate_text

    s = sampling_config(SamplingConfig, **sampling_values(args))
    texts = generate_text(args.checkpoint, args.prompt, s, chat=args.chat)
    for prompt, text in zip(args.prompt, texts):
        print(json.dumps({"prompt": prompt, "completion": text}))
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        from nemo_minitron.eval.lm_eval_adapter import run_lm_eval
    except ImportError as e:
        raise ConfigError(f"lm-eval is not installed ({e.name}); pip install '.[eval]'") from None
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit={args.limit} must be >= 1")
    out = run_lm_eval(args.checkpoint, args.tasks.split(","), args.include_path,
                      batch_size=args.batch_size, limit=args.limit)
    print(json.dumps(out["results"], default=str))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from nemo_minitron.eval.bench import BenchConfig, bench, bench_table

    rows = bench(args.checkpoints, BenchConfig(batch_size=args.batch_size,
                                               seq_length=args.seq_length,
                                               decode_tokens=args.decode_tokens,
                                               repeats=args.repeats,
                                               attention=args.attention,
                                               interleave=not args.sequential),
                 profile=args.profile)
    print(bench_table(rows))
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    """The ``eval`` verb's arguments."""
    p = sub.add_parser("eval", help="perplexity of a checkpoint on data",
                       description="Perplexity on an indexed dataset (--data PREFIX) or on text/"
                                   "JSONL files, in non-overlapping windows; prints JSON. Keys: "
                                   "parallel.*.")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("files", nargs="*", metavar="FILE|key=value",
                   help="text (one document per file) or .jsonl files; parallel.* overrides")
    p.add_argument("--data", help="indexed-dataset prefix instead of files")
    p.add_argument("--seq-length", type=int, help="window length (default: the model's)")
    p.add_argument("--max-windows", type=int, default=0,
                   help="at most this many windows, 0: all")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.set_defaults(func=cmd_eval)


def add_generate(sub: argparse._SubParsersAction) -> None:
    """The ``generate`` verb's arguments."""
    p = sub.add_parser("generate", help="greedy or sampled continuations (KV cache)",
                       description="Continue each --prompt until an end-of-sequence token of "
                                   "the tokenizer (not printed) or --max-new-tokens; prints one "
                                   "JSON line per prompt.")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    sampling_args(p)
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user turn, formatted with the tokenizer's chat template")
    p.set_defaults(func=cmd_generate, decodes=True)


def add_lm_eval(sub: argparse._SubParsersAction) -> None:
    """The ``lm-eval`` verb's arguments."""
    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on a checkpoint",
                       description="Run lm-eval tasks (local task YAMLs under --include-path "
                                   "work offline) with the nemo_minitron model adapter; prints "
                                   "the results as JSON.")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--include-path", help="directory of local task YAML files")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="documents per task")
    p.set_defaults(func=cmd_lm_eval)


def add_bench(sub: argparse._SubParsersAction) -> None:
    """The ``bench`` verb's arguments."""
    p = sub.add_parser("bench", help="prefill/decode tokens/s of checkpoints side by side",
                       description="Measured throughput of each checkpoint, its ratio to the "
                                   "first one, the ratio predicted from FLOPs per token and the "
                                   "share of it achieved (measured / predicted).")
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories (first: reference)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds (after a warm-up); in each the checkpoints take turns and "
                        "the ratios are formed per round (median and range shown)")
    p.add_argument("--sequential", action="store_true",
                   help="time one checkpoint after another, one model in memory at a time (for "
                        "models that do not fit together; ratios then span minutes of drift)")
    p.add_argument("--attention", help="core attention of the local layer spec: local or sdpa "
                   "(default: the build default; the TE spec on GPU has its own)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one decode run per checkpoint: the share of operator time "
                        "in matrix products and the top operators (why decode misses the FLOP "
                        "ratio)")
    p.set_defaults(func=cmd_bench, decodes=True)


VERBS = {"eval": add_eval, "generate": add_generate, "lm-eval": add_lm_eval, "bench": add_bench}
"""This module's verbs: name -> the function adding its arguments (``cli.build_parser``)."""

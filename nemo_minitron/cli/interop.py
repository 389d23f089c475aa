"""Checkpoint interop and evaluation verbs: ``import-hf``, ``import-gguf``, ``import-nemo2``,
``export-hf``, ``eval``, ``generate``, ``lm-eval``, ``bench``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nemo_minitron.cli.common import sampling_config, show_defaults
from nemo_minitron.config import ConfigError
from nemo_minitron.utils.rank import is_rank0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from nemo_minitron.interop.hf_import import import_hf, parse_import_overrides

    parallel, seq_length = parse_import_overrides(args.overrides)
    import_hf(args.hf_dir, args.out, parallel, seq_length)
    return 0


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from nemo_minitron.interop.gguf import import_gguf
    from nemo_minitron.interop.hf_import import parse_import_overrides

    parallel, seq_length = parse_import_overrides(args.overrides)
    import_gguf(args.gguf_file, args.out, parallel, seq_length)
    return 0


def cmd_import_nemo2(args: argparse.Namespace) -> int:
    from nemo_minitron.interop.hf_import import parse_import_overrides
    from nemo_minitron.interop.nemo2 import import_nemo2

    parallel, _ = parse_import_overrides(args.overrides)
    import_nemo2(args.nemo_dir, args.out, parallel)
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from nemo_minitron.interop.hf_export import export_hf

    export_hf(args.checkpoint, args.hf_dir, dtype=args.dtype)
    return 0


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

    s = sampling_config(SamplingConfig, max_new_tokens=args.max_new_tokens,
                        greedy=not args.sample, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
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
    from nemo_minitron.eval.bench import BenchConfig, bench, format_table

    rows = bench(args.checkpoints, BenchConfig(batch_size=args.batch_size,
                                               seq_length=args.seq_length,
                                               decode_tokens=args.decode_tokens,
                                               repeats=args.repeats,
                                               attention=args.attention,
                                               interleave=not args.sequential),
                 profile=args.profile)
    print(format_table(rows))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's verbs."""
    p = sub.add_parser("import-hf", help="Hugging Face Llama/Mistral/Qwen2 -> checkpoint",
                       description="Convert a Hugging Face directory (config.json, safetensors, "
                                   "tokenizer) into a checkpoint. Keys: parallel.* (the layout "
                                   "of the conversion; the result loads under any layout), "
                                   "model.seq_length (default: max_position_embeddings).")
    p.add_argument("hf_dir", help="Hugging Face model directory")
    p.add_argument("out", help="checkpoint directory (must not exist)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("import-gguf", help="llama.cpp GGUF file (Llama/Qwen2) -> checkpoint",
                       description="Dequantize a GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, "
                                   "K-quants...: every type the gguf package reads), rebuild its "
                                   "tokenizer from the metadata and write a checkpoint. Keys: "
                                   "parallel.*, model.seq_length.")
    p.add_argument("gguf_file", help="the .gguf file")
    p.add_argument("out", help="checkpoint directory (must not exist)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_import_gguf)

    p = sub.add_parser("import-nemo2", help="NeMo 2 checkpoint directory -> checkpoint",
                       description="Read a NeMo 2 checkpoint (context/model.yaml, "
                                   "context/nemo_tokenizer, weights/) without NeMo. Keys: "
                                   "parallel.* (layout of the conversion).")
    p.add_argument("nemo_dir", help="NeMo 2 checkpoint directory (holding context/ and weights/)")
    p.add_argument("out", help="checkpoint directory (must not exist)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_import_nemo2)

    p = sub.add_parser("export-hf", help="checkpoint -> Hugging Face directory",
                       description="Write config.json, model.safetensors and the tokenizer so "
                                   "that transformers' from_pretrained loads CHECKPOINT "
                                   "(pruned or not).")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("hf_dir", help="output directory (must not exist)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_export_hf)

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

    p = sub.add_parser("generate", help="greedy or sampled continuations (KV cache)",
                       description="Continue each --prompt until an end-of-sequence token of "
                                   "the tokenizer (not printed) or --max-new-tokens; prints one "
                                   "JSON line per prompt.")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest, 0: all")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user turn, formatted with the tokenizer's chat template")
    p.set_defaults(func=cmd_generate, decodes=True)

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
    show_defaults(sub)

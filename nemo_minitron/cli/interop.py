"""Checkpoint conversion verbs: ``import-hf``, ``import-gguf``, ``import-nemo2``, ``export-hf``."""

from __future__ import annotations

import argparse


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


def add_import_hf(sub: argparse._SubParsersAction) -> None:
    """The ``import-hf`` verb's arguments."""
    p = sub.add_parser("import-hf", help="Hugging Face Llama/Mistral/Qwen2 -> checkpoint",
                       description="Convert a Hugging Face directory (config.json, safetensors, "
                                   "tokenizer) into a checkpoint. Keys: parallel.* (the layout "
                                   "of the conversion; the result loads under any layout), "
                                   "model.seq_length (default: max_position_embeddings).")
    p.add_argument("hf_dir", help="Hugging Face model directory")
    p.add_argument("out", help="checkpoint directory (must not exist)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_import_hf)


def add_import_gguf(sub: argparse._SubParsersAction) -> None:
    """The ``import-gguf`` verb's arguments."""
    p = sub.add_parser("import-gguf", help="llama.cpp GGUF file (Llama/Qwen2) -> checkpoint",
                       description="Dequantize a GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, "
                                   "K-quants...: every type the gguf package reads), rebuild its "
                                   "tokenizer from the metadata and write a checkpoint. Keys: "
                                   "parallel.*, model.seq_length.")
    p.add_argument("gguf_file", help="the .gguf file")
    p.add_argument("out", help="checkpoint directory (must not exist)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_import_gguf)


def add_import_nemo2(sub: argparse._SubParsersAction) -> None:
    """The ``import-nemo2`` verb's arguments."""
    p = sub.add_parser("import-nemo2", help="NeMo 2 checkpoint directory -> checkpoint",
                       description="Read a NeMo 2 checkpoint (context/model.yaml, "
                                   "context/nemo_tokenizer, weights/) without NeMo. Keys: "
                                   "parallel.* (layout of the conversion).")
    p.add_argument("nemo_dir", help="NeMo 2 checkpoint directory (holding context/ and weights/)")
    p.add_argument("out", help="checkpoint directory (must not exist)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_import_nemo2)


def add_export_hf(sub: argparse._SubParsersAction) -> None:
    """The ``export-hf`` verb's arguments."""
    p = sub.add_parser("export-hf", help="checkpoint -> Hugging Face directory",
                       description="Write config.json, model.safetensors and the tokenizer so "
                                   "that transformers' from_pretrained loads CHECKPOINT "
                                   "(pruned or not).")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("hf_dir", help="output directory (must not exist)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_export_hf)


VERBS = {"import-hf": add_import_hf, "import-gguf": add_import_gguf,
         "import-nemo2": add_import_nemo2, "export-hf": add_export_hf}
"""This module's verbs: name -> the function adding its arguments (``cli.build_parser``)."""

"""Data and training verbs: ``data``, ``instruct-data``, ``pretrain``, ``finetune`` (teacher
correction), ``sft``, ``distill``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from nemo_minitron.cli.common import RECIPES, log, recipe_args, show_defaults, split_overrides
from nemo_minitron.config import ConfigError


def cmd_data(args: argparse.Namespace) -> int:
    from nemo_minitron.data.corpus import read_documents, stdlib_files
    from nemo_minitron.data.indexed import iter_input_documents, write_indexed_dataset
    from nemo_minitron.data.tokenizer import load_tokenizer, train_sentencepiece

    if args.inputs:
        def docs() -> Iterator[str]:
            return iter_input_documents(args.inputs, args.json_key)

        total = None
    else:
        files = stdlib_files(args.corpus_max_bytes)

        def docs() -> Iterator[str]:
            return read_documents(files)

        total = len(files)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    elif args.train_tokenizer is not None:
        tok = train_sentencepiece(docs(), args.train_tokenizer,
                                  Path(args.output_prefix).parent / "tokenizer.model",
                                  "--train-tokenizer")
    else:
        raise ConfigError("give --tokenizer (a .model file or HF directory) or "
                          "--train-tokenizer VOCAB_SIZE")
    stats = write_indexed_dataset(docs(), tok, args.output_prefix, total=total)
    print(json.dumps(stats))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.train.preflight import check_fits, check_run_dir
    from nemo_minitron.train.pretrain import completed, pretrain

    recipe, overrides = split_overrides(args)
    r = load_recipe(recipe, overrides)
    check_run_dir(args.out, r.model)  # before the data and the model are built
    check_fits(r, r.model)
    summary = completed(pretrain(r, args.out))
    log.info("final checkpoint: %s", summary["final"])
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from nemo_minitron.checkpoint.io import load_model_config
    from nemo_minitron.config import load_recipe
    from nemo_minitron.train.preflight import check_fits, check_run_dir
    from nemo_minitron.train.pretrain import completed, finetune

    check_run_dir(args.out)  # before anything is built
    recipe, overrides = split_overrides(args)
    r = load_recipe(recipe, overrides)
    check_fits(r, load_model_config(args.checkpoint))
    summary = completed(finetune(r, args.checkpoint, args.out))
    log.info("final checkpoint: %s", summary["final"])
    return 0


def cmd_instruct_data(args: argparse.Namespace) -> int:
    import shutil

    from nemo_minitron.config import DataConfig
    from nemo_minitron.data.embedded_instruct import prepare_embedded_instruct
    from nemo_minitron.utils.fs import atomic_dir

    cfg = DataConfig(cache_dir=args.cache_dir, corpus_max_bytes=args.corpus_max_bytes,
                     seed=args.seed)
    train, valid = prepare_embedded_instruct(cfg, max_chars=args.max_chars,
                                             valid_fraction=args.valid_fraction)
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        shutil.copyfile(train, tmp / "train.jsonl")
        shutil.copyfile(valid, tmp / "valid.jsonl")
    print(json.dumps({"train": str(out / "train.jsonl"), "valid": str(out / "valid.jsonl")}))
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.train.preflight import check_run_dir
    from nemo_minitron.train.pretrain import completed
    from nemo_minitron.train.sft import SFTRecipe, sft

    check_run_dir(args.out)  # before anything is built
    recipe, overrides = split_overrides(args)
    summary = completed(sft(load_recipe(recipe, overrides, cls=SFTRecipe), args.checkpoint,
                            args.data, args.out))
    log.info("final checkpoint: %s", summary["final"])
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from nemo_minitron.checkpoint.io import check_checkpoint, load_model_config
    from nemo_minitron.config import load_recipe
    from nemo_minitron.distill.stage import DistillRecipe, distill
    from nemo_minitron.train.preflight import check_fits, check_run_dir
    from nemo_minitron.train.pretrain import completed

    check_run_dir(args.out)  # before anything is built
    recipe, overrides = split_overrides(args)
    r = load_recipe(recipe, overrides, cls=DistillRecipe)
    teacher = load_model_config(check_checkpoint(args.teacher, "--teacher"))
    check_fits(r, load_model_config(check_checkpoint(args.student, "--student")), [teacher])
    summary = completed(distill(r, args.teacher, args.student, args.out))
    log.info("final checkpoint: %s", summary["final"])
    return 0


def cmd_teacher_cache(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.distill.cache_build import build_teacher_cache
    from nemo_minitron.distill.stage import DistillRecipe

    recipe, overrides = split_overrides(args)
    meta = build_teacher_cache(args.teacher, load_recipe(recipe, overrides, cls=DistillRecipe),
                               args.out, args.top_k)
    log.info("teacher cache %s: %d samples, top-%d; distill with kd.teacher_cache=%s",
             args.out, meta["num_samples"], meta["top_k"], args.out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's verbs."""
    p = sub.add_parser("data", help="tokenize JSONL/text files into a Megatron indexed dataset",
                       description="Tokenize documents into <output-prefix>.bin/.idx. Inputs: "
                                   ".jsonl (one document per line) or text files (one document "
                                   "per file); none: the embedded stdlib corpus.")
    p.add_argument("inputs", nargs="*", help=".jsonl or text files")
    p.add_argument("--output-prefix", required=True, help="output path without .bin/.idx")
    p.add_argument("--tokenizer", help="sentencepiece .model file or Hugging Face directory")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                   help="train a sentencepiece BPE model on the inputs instead")
    p.add_argument("--json-key", default="text", help="JSONL field holding the text")
    p.add_argument("--corpus-max-bytes", type=int, default=8_000_000,
                   help="size of the embedded corpus when no inputs are given")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("pretrain", help="pretrain a model from scratch (a teacher)",
                       description="Pretrain recipe.model on recipe.data; resumes from the "
                                   "latest checkpoint under --out.")
    recipe_args(p)
    p.add_argument("--out", default="runs/pretrain", help="output directory")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="continue training a checkpoint with the LM loss",
                       description="Teacher correction: fine-tune a checkpoint on recipe.data.")
    p.add_argument("checkpoint", help="checkpoint directory to start from")
    recipe_args(p)
    p.add_argument("--out", default="runs/finetune", help="output directory")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("instruct-data", help="write the embedded instruction set (JSONL)",
                       description="The standard library's documented functions as Alpaca "
                                   "examples ('Write the Python function name(signature) that "
                                   "does: <docstring>', the real source as the answer), split "
                                   "into train.jsonl and valid.jsonl by whole source files. "
                                   "Built once in the cache, copied to --out.")
    p.add_argument("--out", required=True, help="new directory for train.jsonl, valid.jsonl")
    p.add_argument("--cache-dir", default="~/.cache/nemo_minitron", help="build cache")
    p.add_argument("--corpus-max-bytes", type=int, default=8_000_000,
                   help="standard-library source read (sorted by path)")
    p.add_argument("--max-chars", type=int, default=2000,
                   help="longest instruction + answer kept, in characters")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="share of the examples held out (whole files)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the held-out split")
    p.set_defaults(func=cmd_instruct_data)

    p = sub.add_parser("sft", help="supervised fine-tuning on instruction data",
                       description="Fine-tune a checkpoint on Alpaca or chat JSONL with the "
                                   "loss on response tokens only, through the training loop, on "
                                   "any TP/PP/DP layout (recipe sections as for finetune, plus "
                                   "sft.valid_data, sft.valid_fraction, sft.pack, "
                                   "sft.chat_template). Resumes from the latest checkpoint "
                                   "under --out.")
    p.add_argument("checkpoint", help="checkpoint directory to start from")
    p.add_argument("data", help="instruction JSONL (Alpaca or chat)")
    recipe_args(p, default=str(RECIPES / "sft.yaml"))
    p.add_argument("--out", default="runs/sft", help="output directory")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("distill", help="knowledge distillation of a teacher into a student",
                       description="Train --student to imitate --teacher (frozen) on recipe.data "
                                   "with the pretraining loop: logit KL (kd.divergence, "
                                   "kd.temperature, kd.top_k), optional ground-truth CE "
                                   "(kd.lm_loss_weight), intermediate hidden-state and "
                                   "embedding losses (kd.hidden_weight, kd.layer_map, "
                                   "kd.embedding_weight). Resumes from the latest checkpoint "
                                   "under --out.")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (frozen)")
    p.add_argument("--student", required=True, help="student checkpoint, e.g. a pruned model")
    recipe_args(p)
    p.add_argument("--out", default="runs/distill", help="output directory")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("teacher-cache", help="store a teacher's top-k log-probabilities once",
                       description="Run --teacher once over the training samples the same "
                                   "distill recipe reads and store its top-k log-probabilities "
                                   "per token in OUT; `distill kd.teacher_cache=OUT` then trains "
                                   "without running the teacher (forward KL on the top-k plus a "
                                   "tail bucket; exact when k covers the vocabulary). Resumes an "
                                   "unfinished build.")
    p.add_argument("--teacher", required=True, help="teacher checkpoint")
    recipe_args(p)
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--top-k", type=int, default=64, help="tokens kept per position "
                   "(default: %(default)s)")
    p.set_defaults(func=cmd_teacher_cache)
    show_defaults(sub)

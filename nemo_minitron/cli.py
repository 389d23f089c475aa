"""``nemo-minitron`` command line: one verb per stage.

Every verb that trains takes a YAML recipe and ``section.key=value`` overrides. User errors
print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from nemo_minitron.config import ConfigError
from nemo_minitron.utils.logging import get_logger, setup_logging

log = get_logger("cli")

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _recipe_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("recipe", nargs="?", default=default,
                   help="YAML recipe (default: %(default)s)")
    p.set_defaults(default_recipe=default)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides such as train.lr=3e-4 model.num_layers=4")


def _split_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """argparse cannot tell an optional recipe from a first override: an argument holding
    '=' is an override, and the verb's default recipe applies."""
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        overrides.insert(0, recipe)
        recipe = args.default_recipe
    return recipe, overrides


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
    elif args.train_tokenizer:
        tok = train_sentencepiece(docs(), args.train_tokenizer,
                                  Path(args.output_prefix).parent / "tokenizer.model")
    else:
        raise ConfigError("give --tokenizer (a .model file or HF directory) or "
                          "--train-tokenizer VOCAB_SIZE")
    stats = write_indexed_dataset(docs(), tok, args.output_prefix, total=total)
    print(json.dumps(stats))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.train.pretrain import pretrain

    recipe, overrides = _split_overrides(args)
    summary = pretrain(load_recipe(recipe, overrides), args.out)
    log.info("final checkpoint: %s", summary["final"])
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.train.pretrain import finetune

    recipe, overrides = _split_overrides(args)
    summary = finetune(load_recipe(recipe, overrides), args.checkpoint, args.out)
    log.info("final checkpoint: %s", summary["final"])
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.prune.stage import PruneRecipe, prune

    recipe, overrides = _split_overrides(args)
    prune(args.checkpoint, args.out, load_recipe(recipe, overrides, cls=PruneRecipe))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.distill.stage import DistillRecipe, distill

    recipe, overrides = _split_overrides(args)
    summary = distill(load_recipe(recipe, overrides, cls=DistillRecipe), args.teacher,
                      args.student, args.out)
    log.info("final checkpoint: %s", summary["final"])
def cmd_import_hf(args: argparse.Namespace) -> int:
    from nemo_minitron.interop.hf_import import import_hf, parse_import_overrides

    parallel, seq_length = parse_import_overrides(args.overrides)
    import_hf(args.hf_dir, args.out, parallel, seq_length)
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
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from nemo_minitron.eval.generate import SamplingConfig, generate_text

    s = SamplingConfig(max_new_tokens=args.max_new_tokens, greedy=not args.sample,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed)
    for prompt, text in zip(args.prompt, generate_text(args.checkpoint, args.prompt, s)):
        print(json.dumps({"prompt": prompt, "completion": text}))
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        from nemo_minitron.eval.lm_eval_adapter import run_lm_eval
    except ImportError as e:
        raise ConfigError(f"lm-eval is not installed ({e.name}); pip install '.[eval]'") from None
    out = run_lm_eval(args.checkpoint, args.tasks.split(","), args.include_path,
                      batch_size=args.batch_size, limit=args.limit)
    print(json.dumps(out["results"], default=str))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from nemo_minitron.eval.bench import BenchConfig, bench, format_table

    rows = bench(args.checkpoints, BenchConfig(batch_size=args.batch_size,
                                               seq_length=args.seq_length,
                                               decode_tokens=args.decode_tokens,
                                               repeats=args.repeats))
    print(format_table(rows))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.search.stage import SearchRecipe, search

    recipe, overrides = _split_overrides(args)
    summary = search(args.checkpoint, args.out, load_recipe(recipe, overrides, cls=SearchRecipe))
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        print(json.dumps(summary))
    return 0


def cmd_bench_method(args: argparse.Namespace) -> int:
    from nemo_minitron.method_bench import load_bench_recipe, run_method_bench

    recipe, overrides = _split_overrides(args)
    command = " ".join(["nemo-minitron", "bench-method", *([recipe] if recipe else []),
                        *overrides, "--out", args.out, "--report", args.report or
                        f"{args.out}/report"])
    print(run_method_bench(load_bench_recipe(recipe, overrides), args.out,
                           args.report or f"{args.out}/report", command))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from nemo_minitron.demo import run_demo

    recipe, overrides = _split_overrides(args)
    run_demo(recipe, overrides, args.out)
    return 0


def _cluster_flags(args: argparse.Namespace) -> dict:
    from nemo_minitron.launch.run import CLUSTER_FLAGS

    return {k: getattr(args, k, None) for k in CLUSTER_FLAGS}


def cmd_launch(args: argparse.Namespace) -> int:
    from nemo_minitron.launch.run import run_launch

    return run_launch(args.recipe, args.overrides, cluster=args.cluster,
                      out=args.out, flags=_cluster_flags(args), dry_run=args.dry_run)


def cmd_validate(args: argparse.Namespace) -> int:
    from nemo_minitron.launch.run import run_validate

    print(json.dumps(run_validate(args.recipe, args.overrides,
                                  flags=_cluster_flags(args),
                                  gpu_memory_gb=args.gpu_memory_gb)))
    return 0


def _launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a pipeline recipe (with stages:), or a plain pretraining "
                                  "recipe (a plain prune recipe: validate only)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides; for a pipeline: workdir=, vars.X=, inputs.X.path=, "
                        "cluster.K=, <stage>.<recipe key>=")
    g = p.add_argument_group("resources (override the recipe's cluster: section)")
    g.add_argument("--nodes", type=int)
    g.add_argument("--gpus-per-node", type=int, help="0: CPU processes with gloo")
    g.add_argument("--tasks-per-node", type=int, help="default: one per GPU")
    g.add_argument("--cpus-per-task", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-minitron",
        description="Minitron structured pruning and knowledge distillation on Megatron-core. "
                    "Multi-process runs: torchrun --nproc-per-node N -m nemo_minitron <verb> ...",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="verb")

    p = sub.add_parser("demo", help="end-to-end demo on the embedded corpus (stdlib source)",
                       description="Build the embedded corpus and tokenizer, pretrain the tiny "
                                   "teacher, and print its validation loss and tokens/s.")
    _recipe_args(p, default=str(RECIPES / "tiny_cpu.yaml"))
    p.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    p.set_defaults(func=cmd_demo)

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
    _recipe_args(p)
    p.add_argument("--out", default="runs/pretrain", help="output directory")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="continue training a checkpoint with the LM loss",
                       description="Teacher correction: fine-tune a checkpoint on recipe.data.")
    p.add_argument("checkpoint", help="checkpoint directory to start from")
    _recipe_args(p)
    p.add_argument("--out", default="runs/finetune", help="output directory")
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("prune", help="importance estimation + structured pruning",
                       description="Score every unit of CHECKPOINT on calibration data (or "
                                   "reuse scores=FILE), prune to the target shape, write the "
                                   "pruned checkpoint to OUT with OUT/pruning/{scores.pt,"
                                   "report.md,*.png}. Keys: target.{num_layers,hidden_size,"
                                   "ffn_hidden_size,num_attention_heads,num_query_groups,"
                                   "drop_layers}, calib.{num_samples,micro_batch_size,"
                                   "batch_agg,seq_agg,eval_samples}, data.*, scores, "
                                   "rescale_norms.")
    p.add_argument("checkpoint", help="source checkpoint")
    p.add_argument("out", help="pruned checkpoint directory (must not exist)")
    _recipe_args(p)
    p.set_defaults(func=cmd_prune)

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
    _recipe_args(p)
    p.add_argument("--out", default="runs/distill", help="output directory")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("search", help="architecture search under a parameter budget",
                       description="Enumerate pruned shapes of CHECKPOINT within "
                                   "search.target_params * (1 +- search.tolerance), prune each "
                                   "from one shared importance pass, distill each for "
                                   "search.retrain_steps steps, rank by validation loss (or "
                                   "search.score_fn) and write OUT/search/{candidates.json,"
                                   "report.md,loss_curves.png} and OUT/winner. Re-running the "
                                   "same command skips finished candidates. Grid keys: "
                                   "search.{layers,hidden,ffn,groups}_step, search.max_{layers,"
                                   "hidden,ffn,heads}_prune, search.proportional_heads, "
                                   "search.max_candidates; also calib.*, kd.*, train.*, data.*, "
                                   "parallel.*.")
    p.add_argument("checkpoint", help="source checkpoint (also the distillation teacher)")
    p.add_argument("out", help="output directory (re-use it to resume)")
    _recipe_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("bench-method", help="reproduce the method's findings in miniature",
                       description="Pretrain the demo teacher (or study.teacher=CKPT), then "
                                   "compare aggregations, importance criteria, width vs depth, "
                                   "KD vs cross-entropy, logit vs logit+intermediate losses, "
                                   "distilled vs from scratch, single-shot vs iterative "
                                   "importance and throughput, each through the library's own "
                                   "stages, and write a Markdown report with PNG plots. "
                                   "Defaults: recipes/method_bench.yaml (about an hour on 2 CPU "
                                   "cores). Re-running the same command reuses finished work.")
    _recipe_args(p)
    p.add_argument("--out", default="runs/method_bench", help="work directory (re-use it to "
                   "resume)")
    p.add_argument("--report", default=None, help="report directory (default OUT/report)")
    p.set_defaults(func=cmd_bench_method)

    p = sub.add_parser("launch", help="run a recipe or pipeline as SLURM jobs (or here)",
                       description="Render one sbatch script per stage (srun, one task per "
                                   "GPU, USR1 -> checkpoint -> requeue) and submit the stages "
                                   "whose output checkpoint is missing, chained by afterok "
                                   "dependencies; --cluster local runs them here with torchrun.")
    _launch_args(p)
    p.add_argument("--cluster", choices=["slurm", "local"], default="slurm")
    p.add_argument("--out", help="output directory of a plain recipe (default: runs/<stem>)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="time limit, e.g. 04:00:00")
    p.add_argument("--container-image", help="pyxis/enroot image, e.g. nvcr.io#nvidia/nemo:TAG")
    p.add_argument("--container-mounts", help="SRC:DST[,SRC:DST...]")
    p.add_argument("--job-name")
    p.add_argument("--signal-seconds", type=int,
                   help="USR1 this long before the time limit (default 300)")
    p.add_argument("--dry-run", action="store_true", help="print the scripts, submit nothing")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("validate", help="check a recipe's layout and memory for a job size",
                       description="Divisibility (TP | heads, groups, ffn, vocab; PP | layers; "
                                   "TP*PP | world; micro batch * DP | global batch) and an "
                                   "estimate of GPU memory per stage; no GPU needed. Prints "
                                   "one JSON record per stage.")
    _launch_args(p)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0,
                   help="memory per GPU (default: %(default)s)")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("import-hf", help="Hugging Face Llama/Mistral/Qwen2 -> checkpoint",
                       description="Convert a Hugging Face directory (config.json, safetensors, "
                                   "tokenizer) into a checkpoint. Keys: parallel.* (the layout "
                                   "of the conversion; the result loads under any layout), "
                                   "model.seq_length (default: max_position_embeddings).")
    p.add_argument("hf_dir", help="Hugging Face model directory")
    p.add_argument("out", help="checkpoint directory (must not exist)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("import-nemo2", help="NeMo 2 checkpoint directory -> checkpoint",
                       description="Read a NeMo 2 checkpoint (context/model.yaml, "
                                   "context/nemo_tokenizer, weights/) without NeMo. Keys: "
                                   "parallel.* (layout of the conversion).")
    p.add_argument("nemo_dir", help="NeMo 2 checkpoint directory (holding context/ and weights/)")
    p.add_argument("out", help="checkpoint directory (must not exist)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_import_nemo2)

    p = sub.add_parser("eval", help="perplexity of a checkpoint on data",
                       description="Perplexity on an indexed dataset (--data PREFIX) or on text/"
                                   "JSONL files, in non-overlapping windows; prints JSON. Keys: "
                                   "parallel.*.")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("files", nargs="*", metavar="FILE|key=value",
                   help="text (one document per file) or .jsonl files; parallel.* overrides")
    p.add_argument("--data", help="indexed-dataset prefix instead of files")
    p.add_argument("--seq-length", type=int, help="window length (default: the model's)")
    p.add_argument("--max-windows", type=int, default=0, help="at most this many windows")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy or sampled continuations (KV cache)",
                       description="Continue each --prompt; prints one JSON line per prompt.")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

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
                                   "first one and the ratio predicted from FLOPs per token.")
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories (first: reference)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export-hf", help="checkpoint -> Hugging Face directory",
                       description="Write config.json, model.safetensors and the tokenizer so "
                                   "that transformers' from_pretrained loads CHECKPOINT "
                                   "(pruned or not).")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("hf_dir", help="output directory (must not exist)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_export_hf)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling the overrides at the first option; key=value words after
    # options are overrides too.
    if extra and isinstance(getattr(args, "overrides", None), list) \
            and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # torchrun sets RANK; srun sets SLURM_PROCID (RANK comes later, from the runtime).
    rank0 = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0
    try:
        return args.func(args)
    except (ConfigError, FileExistsError) as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # training errors carry their own one-line cause
        from nemo_minitron.train.loop import TrainingError

        if isinstance(e, TrainingError):
            if rank0:
                print(f"error: {e}", file=sys.stderr)
            return 3
        raise
    finally:
        if "megatron.core" in sys.modules:  # launch/validate never start torch.distributed
            from nemo_minitron.parallel.runtime import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())

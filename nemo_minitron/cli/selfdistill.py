"""``self-distill``: the teacher rewrites an instruction data set (self-data distillation)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nemo_minitron.cli.common import (
    sampling_args,
    sampling_config,
    sampling_values,
    source_constant,
    source_fields,
)
from nemo_minitron.config import ConfigError


def cmd_self_distill(args: argparse.Namespace) -> int:
    from nemo_minitron.config import ParallelConfig, from_dict, parse_overrides
    from nemo_minitron.parallel.runtime import current_runtime
    from nemo_minitron.selfdistill.prompt import DEFAULT_REWRITE_TEMPLATE
    from nemo_minitron.selfdistill.stage import SelfDistillConfig, rewrite_sampling, self_distill

    data = parse_overrides(args.overrides)
    parallel = from_dict(ParallelConfig, data.pop("parallel", None), "parallel.")
    if data:
        raise ConfigError(f"unknown override {next(iter(data))!r} (self-distill takes "
                          "parallel.*)")
    template = DEFAULT_REWRITE_TEMPLATE
    if args.prompt_template:
        path = Path(args.prompt_template)
        if not path.is_file():
            raise ConfigError(f"--prompt-template {str(path)!r} does not exist")
        template = path.read_text()
    given = sampling_values(args)
    batch = {"batch_size": args.batch_size} if hasattr(args, "batch_size") else {}
    cfg = SelfDistillConfig(sampling=sampling_config(rewrite_sampling, **given), **batch,
                            prompt_template=template, verifier=args.verifier, stats=args.stats)
    stats = self_distill(args.teacher, args.data, args.out, cfg, parallel, student=args.student)
    if current_runtime().rank == 0 and stats is not None:
        print(json.dumps({k: v for k, v in stats.items() if k != "rejections"}))
    return 0


STAGE = "nemo_minitron.selfdistill.stage"
"""The module owning self-distill's defaults."""


def add_self_distill(sub: argparse._SubParsersAction) -> None:
    """The ``self-distill`` verb's arguments."""
    p = sub.add_parser(
        "self-distill", help="the teacher rewrites every response of an instruction set",
        description="Self-data distillation (arXiv 2410.09982): the teacher answers each "
                    "instruction of DATA (Alpaca or chat JSONL) again, given the reference "
                    "answer; rewrites that mention the reference, are empty, are cut at "
                    "--max-new-tokens or fail --verifier keep the original answer. Writes OUT "
                    "(same format, input order) and a stats JSON; a killed run continues from "
                    "OUT.parts. Keys: parallel.* (TP and DP; PP=1).")
    p.add_argument("teacher", help="teacher checkpoint directory")
    p.add_argument("data", help="instruction JSONL (Alpaca or chat)")
    p.add_argument("--out", required=True, help="output JSONL (must not exist)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="parallel.tensor_model_parallel_size=2 ...")
    p.add_argument("--prompt-template", metavar="FILE",
                   help="rewrite prompt with {instruction} and {reference} (default: "
                        "selfdistill.prompt.DEFAULT_REWRITE_TEMPLATE)")
    p.add_argument("--verifier", help="math, code or module:function(instruction, reference, "
                                      "rewrite) -> bool")
    p.add_argument("--student", help="checkpoint to be fine-tuned on OUT: its tokenizer must "
                                     "be the teacher's")
    p.add_argument("--stats", help="stats JSON (default: OUT's stem + .stats.json)")
    # Flags typed are passed on, the others left to SelfDistillConfig and rewrite_sampling
    # (their defaults, read from the source: importing it would import torch for --help).
    _, batch, doc = source_fields(STAGE, "SelfDistillConfig")["batch_size"]
    p.add_argument("--batch-size", type=int, default=argparse.SUPPRESS,
                   help=f"{doc[0].lower()}{doc[1:].rstrip('.')} (default: {batch})")
    sampling_args(p, source_constant(STAGE, "REWRITE_SAMPLING"), only_given=True,
                  notes={"seed": "batch k samples with seed + k"})
    p.set_defaults(func=cmd_self_distill, decodes=True)


VERBS = {"self-distill": add_self_distill}
"""This module's verbs: name -> the function adding its arguments (``cli.build_parser``)."""

"""``specdec``: speculative decoding of a target checkpoint with a (pruned) draft checkpoint;
acceptance figures and speed-up, one row per K."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nemo_minitron.cli.common import sampling_args, sampling_config, sampling_values
from nemo_minitron.config import ConfigError


def _draft_tokens(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--draft-tokens={text!r} must be integers separated by commas") \
            from None


def cmd_specdec(args: argparse.Namespace) -> int:
    from nemo_minitron.config import ParallelConfig, from_dict, parse_overrides
    from nemo_minitron.eval.generate import SamplingConfig
    from nemo_minitron.eval.specdec_run import SpecDecConfig, plot_sweep, specdec, specdec_table
    from nemo_minitron.utils.fs import atomic_write_json, atomic_write_text

    data = parse_overrides(args.overrides)
    unknown = [k for k in data if k != "parallel"]
    if unknown:
        raise ConfigError(f"unknown override section {unknown[0]!r} (specdec takes parallel.*)")
    parallel = from_dict(ParallelConfig, data.get("parallel"), "parallel.")
    cfg = SpecDecConfig(draft_tokens=_draft_tokens(args.draft_tokens),
                        batch_size=args.batch_size, repeats=args.repeats)
    s = sampling_config(SamplingConfig, **sampling_values(args))
    if s.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={s.max_new_tokens} must be at least 1")
    rows = specdec(args.target, args.draft, args.prompts, args.data, s, cfg,
                   num_prompts=args.num_prompts, prompt_length=args.prompt_length,
                   parallel=parallel, chat=args.chat)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    table = specdec_table(rows)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "specdec.json", rows)
        atomic_write_text(out / "specdec.md", table + "\n")
        plot_sweep(rows, out / "specdec.png")
    print(table)
    return 0


def add_specdec(sub: argparse._SubParsersAction) -> None:
    """The ``specdec`` verb's arguments."""
    p = sub.add_parser(
        "specdec", help="speculative decoding with a draft model: acceptance and speed-up",
        description="Decode the prompts with TARGET alone and with TARGET verifying K tokens "
                    "proposed by DRAFT (greedy: identical output; --sample: the same "
                    "distribution). Prints a table per K: acceptance rate, mean acceptance "
                    "length, conditional acceptance by draft position, the draft/target step "
                    "cost c, the predicted speed-up (1-a^(K+1))/((1-a)(Kc+1)) and the measured "
                    "one; --out DIR also writes specdec.{json,md,png}. Keys: parallel.*.")
    p.add_argument("--target", required=True, help="target checkpoint")
    p.add_argument("--draft", required=True, help="draft checkpoint (same tokenizer)")
    p.add_argument("--prompts", help="text file (one prompt per line) or .jsonl ('prompt')")
    p.add_argument("--data", help="indexed-dataset prefix: prompts from its last documents")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=32, help="prompt tokens (--data)")
    p.add_argument("--draft-tokens", default="4", help="K, or a sweep such as 1,2,4,8")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up")
    sampling_args(p)
    p.add_argument("--chat", action="store_true",
                   help="each --prompts line is a user turn, formatted with the target "
                        "tokenizer's chat template (as generate --chat)")
    p.add_argument("--out", help="directory for specdec.{json,md,png} (default: none, the "
                   "table is only printed)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_specdec, decodes=True)


VERBS = {"specdec": add_specdec}
"""This module's verbs: name -> the function adding its arguments (``cli.build_parser``)."""

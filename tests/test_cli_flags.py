"""The sampling flags of ``generate``, ``specdec`` and ``self-distill`` are generated from
``SamplingConfig`` (read from its source, so ``--help`` imports no torch): checked here against
the imported dataclass and self-distill's own defaults, flag by flag."""

from __future__ import annotations

import dataclasses

import pytest

from nemo_minitron.cli import build_parser
from nemo_minitron.cli.common import sampling_values
from nemo_minitron.eval.generate import SamplingConfig
from nemo_minitron.selfdistill.stage import SelfDistillConfig, rewrite_sampling

VERBS = {"generate": ["generate", "CK", "--prompt", "a"],
         "specdec": ["specdec", "--target", "T", "--draft", "D"],
         "self-distill": ["self-distill", "T", "DATA", "--out", "O"]}
FLAGS = {"max_new_tokens": ("--max-new-tokens", "7"), "temperature": ("--temperature", "0.5"),
         "top_k": ("--top-k", "3"), "top_p": ("--top-p", "0.9"), "seed": ("--seed", "11")}


def _parse(argv: list[str]):
    args, extra = build_parser().parse_known_args(argv)
    assert extra == []
    return args


@pytest.mark.parametrize("verb", ["generate", "specdec"])
def test_no_flag_gives_sampling_configs_defaults(verb):
    assert SamplingConfig(**sampling_values(_parse(VERBS[verb]))) == SamplingConfig()


def test_self_distill_passes_on_only_what_is_typed():
    assert sampling_values(_parse(VERBS["self-distill"])) == {}
    assert not hasattr(_parse(VERBS["self-distill"]), "batch_size")


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_field_has_its_flag(verb):
    typed = [w for flag, value in FLAGS.values() for w in (flag, value)]
    switch = "--greedy" if verb == "self-distill" else "--sample"
    got = sampling_values(_parse(VERBS[verb] + typed + [switch]))
    assert got == {"max_new_tokens": 7, "temperature": 0.5, "top_k": 3, "top_p": 0.9,
                   "seed": 11, "greedy": verb == "self-distill"}
    # Every field of the dataclass but the tokenizer's stop tokens is a flag.
    assert {f.name for f in dataclasses.fields(SamplingConfig)} - set(got) == {"stop_tokens"}


@pytest.mark.parametrize("verb, defaults", [
    ("generate", SamplingConfig()), ("specdec", SamplingConfig()),
    ("self-distill", rewrite_sampling())])
def test_help_names_the_defaults_the_verb_uses(verb, defaults):
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    text = " ".join(sub.choices[verb].format_help().split())
    for name, (flag, _) in FLAGS.items():
        assert f"{flag} {name.upper()} " in text
        after = text.split(f"{flag} {name.upper()} ", 1)[1]
        assert after.split(" --", 1)[0].rstrip().endswith(f"(default: {getattr(defaults, name)})")
    if verb == "self-distill":
        assert f"(default: {SelfDistillConfig().batch_size})" in text

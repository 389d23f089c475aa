"""The command line: --help on every verb, and bad input as a one-line error with a non-zero
exit and no output directory left behind. Most run ``cli.main`` in this process
(``tests.cli.cli``); the exit status of a real process and torchrun are tested in children."""

from __future__ import annotations

import pytest

from tests.cli import _one_line_error, cli, run_module, run_torchrun

VERBS = ["demo", "data", "pretrain", "finetune", "prune", "distill", "search", "bench-method",
         "launch", "validate", "import-hf", "import-gguf", "import-nemo2", "export-hf", "eval",
         "generate", "lm-eval", "bench", "specdec", "merge", "sft", "instruct-data",
         "teacher-cache", "self-distill"]


@pytest.mark.parametrize("verb", VERBS)
def test_help(verb):
    res = cli(verb, "--help")
    assert res.returncode == 0
    assert "usage: nemo-minitron " + verb in res.stdout


def _given_defaults(verb: str) -> list[tuple[str, object]]:
    """``(argument, default)`` of every argument of ``verb`` that has a default (not None,
    False or suppressed), read from the parser itself."""
    import argparse

    from nemo_minitron.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(a.option_strings[0] if a.option_strings else a.dest, a.default)
            for a in sub.choices[verb]._actions
            if a.default is not None and a.default is not False and a.default != []
            and a.default != argparse.SUPPRESS and (a.option_strings or a.nargs in ("?", "*"))]


@pytest.mark.parametrize("verb", VERBS)
def test_help_names_every_default(verb):
    res = cli(verb, "--help", env={"COLUMNS": "2000"})  # help texts unwrapped
    lines = res.stdout.splitlines()
    for name, default in _given_defaults(verb):
        i = next(i for i, x in enumerate(lines) if x.split()[:1] == [name])
        # the argument's entry: its line, and the next when argparse moved the help there
        entry = lines[i] + (lines[i + 1] if i + 1 < len(lines)
                            and lines[i + 1].startswith(" " * 10) else "")
        assert f"default: {default}" in entry, (name, entry)


def test_pretrain_help_names_the_output_default():
    assert "--out OUT output directory (default: runs/pretrain)" in " ".join(
        cli("pretrain", "--help").stdout.split())


def test_prune_help_lists_the_layer_metrics():
    import typing

    from nemo_minitron.prune.plan import Target

    text = " ".join(cli("prune", "--help").stdout.split())
    assert "target.layer_metric" in text
    for choice in typing.get_args(typing.get_type_hints(Target)["layer_metric"]):
        assert choice in text, choice


@pytest.mark.parametrize("recipe_text, override, needles", [
    (None, [], ["does not exist"]),
    ("model: [1, 2\n", [], ["is not valid YAML", "line"]),
    ("- a\n- b\n", [], ["must be a YAML mapping"]),
    ("model:\n  num_layers: 2\n", ["train.lrr=1"], ["unknown key 'train.lrr'"]),
    ("model:\n  num_layers: 2\n", ["train.lr=fast"], ["train.lr='fast' must be a number"]),
    ("model:\n  num_attention_heads: 8\n  num_query_groups: 3\n", [],
     ["model.num_attention_heads=8 is not divisible by model.num_query_groups=3"]),
    ("train:\n  global_batch_size: 6\n  micro_batch_size: 4\n", [],
     ["train.global_batch_size=6 is not divisible by train.micro_batch_size=4"]),
])
def test_bad_recipe_is_a_one_line_error(tmp_path, recipe_text, override, needles):
    recipe = tmp_path / "r.yaml"
    if recipe_text is not None:
        recipe.write_text(recipe_text)
    out = tmp_path / "out"
    res = cli("pretrain", str(recipe), *override, "--out", str(out))
    _one_line_error(res, *needles)
    assert not out.exists()


def test_layout_error_exits_2_from_a_process(tmp_path):
    # Found while starting the runtime (after the CPU backend is installed): a child process.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  num_layers: 2\n")
    out = tmp_path / "out"
    res = run_module("pretrain", str(recipe), "parallel.pipeline_model_parallel_size=2", "--out",
                     str(out))
    _one_line_error(res, "does not divide the world size 1")
    assert not out.exists()


@pytest.mark.dist
def test_model_dims_must_divide_tp_under_torchrun(tmp_path, tiny_overrides):
    out = tmp_path / "out"
    res = run_torchrun(2, "pretrain", *tiny_overrides, "parallel.tensor_model_parallel_size=2",
                       "model.ffn_hidden_size=129", "--out", str(out))
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: model.ffn_hidden_size=129 is not divisible by "
                      "parallel.tensor_model_parallel_size=2"], res.stderr
    assert not out.exists()


def test_missing_dataset_path(tmp_path, tiny_overrides, embedded_paths):
    out = tmp_path / "out"
    res = run_module("pretrain", *tiny_overrides, f"data.path={tmp_path}/nope",
                     f"data.tokenizer={embedded_paths[1]}", "--out", str(out))
    _one_line_error(res, "data.path=", "nope.bin does not exist")
    assert not out.exists()


def test_finetune_of_a_non_checkpoint(tmp_path, tiny_overrides):
    out = tmp_path / "out"
    res = run_module("finetune", str(tmp_path), *tiny_overrides, "--out", str(out))
    _one_line_error(res, "is not a nemo_minitron checkpoint")
    assert not out.exists()


def test_data_command_refuses_a_vocabulary_too_large_for_the_text(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "import os\\n"}\n{"text": "x = 2\\n"}\n')
    # Two short lines hold far fewer than 300 distinct pieces: sentencepiece refuses the size.
    res = cli("data", str(tmp_path / "docs.jsonl"), "--output-prefix",
              str(tmp_path / "ds" / "corpus"), "--train-tokenizer", "300")
    _one_line_error(res, "--train-tokenizer=300 is too large for this text", "at most")
    assert not (tmp_path / "ds").exists()


def test_data_command_builds_an_indexed_dataset(tmp_path):
    res = cli("data", "--output-prefix", str(tmp_path / "ds2" / "corpus"),
              "--train-tokenizer", "400", "--corpus-max-bytes", "200000")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "ds2" / "corpus.bin").is_file()
    assert (tmp_path / "ds2" / "corpus.idx").is_file()
    assert '"documents"' in res.stdout

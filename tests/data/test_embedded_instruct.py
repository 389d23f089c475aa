"""The embedded instruction set: real stdlib answers (checked against ``inspect.getsource`` of
the imported function and against ``compile``), held-out files disjoint, built once."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import types
from pathlib import Path

import pytest

from nemo_minitron.config import DataConfig
from nemo_minitron.data.embedded_instruct import prepare_embedded_instruct
from nemo_minitron.data.instruct import read_jsonl

# Modules safe to import (no side effects) whose functions we compare with inspect.getsource.
SAFE = {"base64", "bisect", "calendar", "codeop", "codecs", "ast", "abc", "bz2", "bdb"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = DataConfig(cache_dir=str(tmp_path_factory.mktemp("ic")), corpus_max_bytes=1_500_000)
    return cfg, prepare_embedded_instruct(cfg)


def _function_code(source: str, name: str) -> types.CodeType | None:
    module = compile(source, "<answer>", "exec")
    return next((c for c in module.co_consts
                 if isinstance(c, types.CodeType) and c.co_name == name), None)


def test_every_answer_compiles_and_defines_its_function(built):
    _, (train, valid) = built
    for path in (train, valid):
        for ex in read_jsonl(path):
            name = ex.source["name"]
            assert re.match(rf"Write the Python (async )?function {re.escape(name)}\(",
                            ex.prompt_messages[0]["content"])
            assert " that does: " in ex.prompt_messages[0]["content"]
            assert _function_code(ex.response, name) is not None, (ex.source["file"], name)


def test_answers_are_the_real_source(built):
    _, (train, valid) = built
    checked = 0
    for ex in read_jsonl(train) + read_jsonl(valid):
        mod = ex.source["file"].removesuffix(".py").replace("/", ".")
        if mod not in SAFE:
            continue
        fn = getattr(importlib.import_module(mod), ex.source["name"])
        fn = inspect.unwrap(fn)
        if not inspect.isfunction(fn) or fn.__module__ != mod \
                or fn.__code__.co_filename.startswith("<frozen"):
            continue  # a C accelerator (bisect's _bisect) or a frozen module (abc)
        assert ex.response == inspect.getsource(fn).rstrip() + "\n"
        assert inspect.getdoc(fn).strip() in ex.prompt_messages[0]["content"]
        checked += 1
    assert checked >= 10


def test_held_out_split_shares_no_file_and_is_cached(built):
    cfg, (train, valid) = built
    tr, va = read_jsonl(train), read_jsonl(valid)
    assert len(tr) > 20 and len(va) >= 1
    assert {e.source["file"] for e in tr}.isdisjoint({e.source["file"] for e in va})
    done = Path(train).parent / "done.json"
    stamp = done.stat().st_mtime_ns
    assert prepare_embedded_instruct(cfg) == (train, valid)
    assert done.stat().st_mtime_ns == stamp  # not rebuilt
    assert json.loads(done.read_text())["train"] == len(tr)


def test_instruct_data_verb_copies_the_cached_set(built, tmp_path, capsys):
    from nemo_minitron.cli import main

    cfg, (train, valid) = built
    args = ["instruct-data", "--cache-dir", cfg.cache_dir, "--corpus-max-bytes",
            str(cfg.corpus_max_bytes), "--out", str(tmp_path / "instr")]
    assert main(args) == 0
    paths = json.loads(capsys.readouterr().out)
    assert Path(paths["train"]).read_text() == Path(train).read_text()
    assert Path(paths["valid"]).read_text() == Path(valid).read_text()
    assert main(args) == 2  # the output exists: one line, nothing overwritten
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "already exists" in err[0]

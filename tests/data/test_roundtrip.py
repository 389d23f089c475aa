"""Tokenizer + indexed dataset round trip, and the `data` command's input handling."""

from __future__ import annotations

import json

import pytest

from nemo_minitron.config import ConfigError
from nemo_minitron.data.corpus import read_documents, stdlib_files
from nemo_minitron.data.indexed import (
    iter_input_documents,
    read_indexed_documents,
    write_indexed_dataset,
)
from nemo_minitron.data.tokenizer import load_tokenizer, train_sentencepiece


def test_embedded_corpus_roundtrips_token_for_token(tmp_path):
    files = stdlib_files(400_000)
    docs = list(read_documents(files))
    tok = train_sentencepiece(docs, 800, tmp_path / "tok.model")
    stats = write_indexed_dataset(docs, tok, tmp_path / "corpus", progress=False)
    assert stats["documents"] == len(docs)
    back = list(read_indexed_documents(tmp_path / "corpus"))
    assert len(back) == len(docs)
    for doc, ids in zip(docs, back):
        expected = tok.encode(doc) + [tok.eod]
        assert ids.tolist() == expected
        assert ids[-1] == tok.eod
        assert tok.decode(ids[:-1].tolist()) == doc  # exact text, whitespace included
    assert sum(len(x) for x in back) == stats["tokens"]
    # A reload of the saved tokenizer gives the same ids.
    assert load_tokenizer(tmp_path / "tok.model").encode(docs[0]) == tok.encode(docs[0])


def test_jsonl_and_text_inputs(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x = 1\n"}) + "\n\n"
                                      + json.dumps({"text": "def f():\n    pass\n"}) + "\n")
    (tmp_path / "b.txt").write_text("print('hi')\n")
    docs = list(iter_input_documents([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")]))
    assert docs == ["x = 1\n", "def f():\n    pass\n", "print('hi')\n"]


@pytest.mark.parametrize("content, message", [
    ("{not json}\n", "a.jsonl:1 is not valid JSON"),
    (json.dumps({"body": "x"}) + "\n", "a.jsonl:1 has no string field 'text'"),
])
def test_bad_jsonl_is_a_one_line_error(tmp_path, content, message):
    (tmp_path / "a.jsonl").write_text(content)
    with pytest.raises(ConfigError, match=message):
        list(iter_input_documents([str(tmp_path / "a.jsonl")]))


def test_missing_input(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        list(iter_input_documents([str(tmp_path / "nope.jsonl")]))


def test_failed_build_leaves_nothing(tmp_path):
    tok = train_sentencepiece(read_documents(stdlib_files(200_000)), 600, tmp_path / "t.model")

    def docs():
        yield "a = 1\n"
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_indexed_dataset(docs(), tok, tmp_path / "out" / "corpus", progress=False)
    assert not (tmp_path / "out").exists()  # not even the directory it made

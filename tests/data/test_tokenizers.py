"""Hugging Face tokenizer directories work wherever a sentencepiece model does."""

from __future__ import annotations

import pytest

from nemo_minitron.config import ConfigError
from nemo_minitron.data.corpus import read_documents, stdlib_files
from nemo_minitron.data.indexed import read_indexed_documents, write_indexed_dataset
from nemo_minitron.data.tokenizer import HFTokenizer, load_tokenizer


def _hf_tokenizer_dir(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(read_documents(stdlib_files(200_000)), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(
        str(path))
    return path


def test_hf_tokenizer_roundtrip_through_indexed_dataset(tmp_path):
    tok = load_tokenizer(_hf_tokenizer_dir(tmp_path / "hf"))
    assert isinstance(tok, HFTokenizer)
    assert tok.eod == 0
    docs = list(read_documents(stdlib_files(60_000)))
    write_indexed_dataset(docs, tok, tmp_path / "c", progress=False)
    for doc, ids in zip(docs, read_indexed_documents(tmp_path / "c")):
        assert ids[-1] == tok.eod
        assert tok.decode(ids[:-1].tolist()) == doc


def test_directory_without_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="holds no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)

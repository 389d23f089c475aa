"""Hugging Face tokenizer directories work wherever a sentencepiece model does, and every kind
of tokenizer the importers accept encodes exactly as its source: a ``tokenizer.json`` as the
``tokenizers`` library reads it, a ``tokenizer.model`` as sentencepiece does (the GGUF one:
tests/interop/test_gguf.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_minitron.config import ConfigError
from nemo_minitron.data.corpus import read_documents, stdlib_files
from nemo_minitron.data.indexed import read_indexed_documents, write_indexed_dataset
from nemo_minitron.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from tests.helpers.data import MIXED, TEXTS, _hf_tokenizer_dir


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


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTES = [f"<0x{i:02X}>" for i in range(256)]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return list(read_documents(stdlib_files(120_000))) + [MIXED.replace("def", "class")]


def _train(corpus: list[str], kind: str):
    """A ``tokenizers`` BPE of one of the pipelines real checkpoints ship in tokenizer.json."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    specials = ["<unk>", "<s>", "</s>"]
    if kind.startswith("bytelevel"):
        tok = Tokenizer(models.BPE())
        llama3 = kind == "bytelevel-llama3"  # its own split, then bytes without GPT-2's regex
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not llama3)
        tok.pre_tokenizer = byte_level if not llama3 else pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # sentencepiece-style: "▁" for spaces, byte fallback
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        scheme = kind.rsplit("-", 1)[-1]
        if kind.startswith("metaspace"):  # Mistral / newer Llama-2 conversions
            tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme, split=False)
        else:  # the original Llama-2 conversion: the marker put in by the normaliser
            steps = [normalizers.Prepend("▁")] if scheme == "prepend" else []
            tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials + BYTES,
                                      show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    if kind in ("bytelevel-llama3", "metaspace-first"):  # the BOS their configs declare
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


# tokenizer.json pipeline -> the tokenizer_class its checkpoints name in tokenizer_config.json
# (transformers 5 rebuilds the named classes' pre-tokenizers; LlamaTokenizerFast on a byte-level
# file is how a NeMo 2 checkpoint of a Llama with such a tokenizer names it).
JSON_KINDS = {"bytelevel-gpt2": "GPT2Tokenizer", "bytelevel-llama3": "PreTrainedTokenizerFast",
              "bytelevel-nemo2": "LlamaTokenizerFast", "metaspace-first": "LlamaTokenizerFast",
              "metaspace-never": "LlamaTokenizerFast", "normalizer-prepend": "LlamaTokenizer",
              "normalizer-none": "LlamaTokenizer"}


@pytest.mark.parametrize("kind", JSON_KINDS)
def test_tokenizer_json_encodes_as_tokenizers_library(corpus, tmp_path, kind):
    from tokenizers import Tokenizer as Reference

    _train(corpus, kind).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": JSON_KINDS[kind], "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>"}))
    from transformers import AutoTokenizer

    ref = Reference.from_file(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)
    ours.save(tmp_path / "saved")  # the copy a checkpoint keeps, and export-hf writes
    saved = load_tokenizer(tmp_path / "saved")
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))  # as users load it
    for tok in (ours, saved):
        assert isinstance(tok, HFTokenizer)
        for text in TEXTS:
            want = ref.encode(text, add_special_tokens=False).ids
            assert tok.encode(text) == want, (kind, text)
            assert tok.decode(want) == ref.decode(want)
            assert tok.tok.encode(text) == ref.encode(text).ids  # the file's BOS handling
            assert exported.encode(text, add_special_tokens=False) == want
    assert ours.eod == ref.token_to_id("</s>")
    # A name transformers 4 knows too (it has no TokenizersBackend).
    saved_cfg = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert saved_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def _spm(corpus: list[str], out: Path, dummy_prefix: bool) -> Path:
    """Our own trainer's model (no dummy prefix) or a Llama-2-style one (dummy prefix)."""
    import sentencepiece as spm

    if not dummy_prefix:
        train_sentencepiece(corpus, 600, out)
        return out
    lines = [line for doc in corpus for line in doc.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out.with_suffix("")), vocab_size=600,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        minloglevel=2)
    return out


@pytest.mark.parametrize("dummy_prefix", [False, True])
@pytest.mark.parametrize("where", ["file", "hf_dir"])
def test_sentencepiece_model_encodes_as_sentencepiece(corpus, tmp_path, dummy_prefix, where):
    import sentencepiece as spm

    model = _spm(corpus, tmp_path / "tokenizer.model", dummy_prefix)
    if where == "hf_dir":  # transformers would convert it with LlamaTokenizer's own pipeline
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}))
    ref = spm.SentencePieceProcessor(model_file=str(model))
    ours = load_tokenizer(model if where == "file" else tmp_path)
    ours.save(tmp_path / "saved")
    for tok in (ours, load_tokenizer(tmp_path / "saved")):
        assert isinstance(tok, SentencePieceTokenizer)
        for text in TEXTS:
            assert tok.encode(text) == ref.encode(text), (dummy_prefix, where, text)

"""Tokenizers: sentencepiece models (trained here on the embedded corpus, or the user's) and
Hugging Face tokenizers, behind one small interface that Megatron's datasets accept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nemo_minitron.config import ConfigError
from nemo_minitron.utils.logging import get_logger

log = get_logger("data.tokenizer")


class Tokenizer:
    """Common interface: ``encode``, ``decode``, ``vocab_size``, ``eod``."""

    kind: str = ""
    vocab_size: int
    eod: int
    path: Path | None = None
    """The file or directory it was loaded from."""
    _fingerprint: str | None = None  # tokenizer_fingerprint's, computed once

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Copy the tokenizer files into ``directory`` (part of every checkpoint)."""
        raise NotImplementedError

    def pieces(self) -> list[Any]:
        """Every id's piece (and what else decides the encoding, e.g. BPE scores), in id
        order: what ``tokenizer_fingerprint`` hashes."""
        raise NotImplementedError

    @property
    def unique_identifiers(self) -> dict[str, object]:
        """What Megatron's dataset cache key records about the tokenizer (not its path, so a
        tokenizer copied into a checkpoint keeps the same cache)."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eod": self.eod}

    @property
    def eos_ids(self) -> list[int]:
        """Every end-of-sequence token (generation stops at any of them); ``eod`` first."""
        return [self.eod]

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own jinja2 chat template (Hugging Face), None when it has none."""
        return None

    @property
    def special_tokens(self) -> dict[str, str]:
        """Special-token strings a chat template may reference (``bos_token``, ...)."""
        return {}

    # Megatron's dataset classes call `tokenize`/`detokenize`.
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.decode(ids)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file; ``eod`` is the model's ``</s>``."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike[str]):
        import sentencepiece as spm

        self.path = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self.eod = self.sp.eos_id()
        if self.eod < 0:
            raise ConfigError(f"data.tokenizer={str(model_file)!r} has no end-of-sequence piece")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, directory: str | os.PathLike[str]) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, Path(directory) / "tokenizer.model")

    def pieces(self) -> list[Any]:
        return [[self.sp.id_to_piece(i), self.sp.get_score(i)] for i in range(self.vocab_size)]


# Arguments of ``from_pretrained`` that ``save_pretrained`` copies into tokenizer_config.json;
# a saved tokenizer must not carry how it was once loaded.
_LOADER_ARGS = ("local_files_only", "is_local", "trust_remote_code", "cache_dir", "revision",
                "token", "force_download", "proxies", "subfolder", "_commit_hash")
GENERATION_CONFIG = "generation_config.json"


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory (``tokenizer.json`` and friends), loaded offline.

    A ``generation_config.json`` beside it (a model directory's, or the one ``save`` writes)
    adds its ``eos_token_id`` list to ``eos_ids`` (Llama 3 and chat models end turns with
    several tokens)."""

    kind = "huggingface"

    def __init__(self, directory: str | os.PathLike[str]):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        self.path = Path(directory)
        if (self.path / "tokenizer.json").is_file():
            # Not AutoTokenizer: transformers 5 gives a named class (LlamaTokenizer,
            # GPT2Tokenizer, ...) only tokenizer.json's vocabulary and merges and rebuilds the
            # normaliser and pre-tokenizer its own way (a word-start marker the file may not
            # use). The generic class runs the file's pipeline as written, as `tokenizers` does.
            self.tok = PreTrainedTokenizerFast.from_pretrained(str(self.path),
                                                               local_files_only=True)
        else:  # vocab/merges files or tiktoken: no tokenizers pipeline to follow
            self.tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.vocab_size = len(self.tok)
        eod = self.tok.eos_token_id
        if eod is None:
            raise ConfigError(f"data.tokenizer={str(directory)!r} has no eos token")
        self.eod = int(eod)
        self._eos = [self.eod]
        gen = self.path / GENERATION_CONFIG
        if gen.is_file():
            try:
                more = json.loads(gen.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError):
                raise ConfigError(f"{gen} is not a JSON object") from None
            more = more if isinstance(more, list) else [more]
            self._eos += [int(i) for i in more if isinstance(i, int) and i not in self._eos]

    @property
    def eos_ids(self) -> list[int]:
        return list(self._eos)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def save(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        self.tok.save_pretrained(str(d))
        cfg_file = d / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        for key in _LOADER_ARGS:
            cfg.pop(key, None)
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            # transformers 5's name for it; 4 (NeMo's) knows only this alias of the same class.
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        if len(self._eos) > 1:
            (d / GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": self._eos}) + "\n")

    def pieces(self) -> list[Any]:
        return self.tok.convert_ids_to_tokens(list(range(self.vocab_size)))

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.tok, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default")
        return template if isinstance(template, str) and template else None

    @property
    def special_tokens(self) -> dict[str, str]:
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        return {n: str(getattr(self.tok, n)) for n in names if getattr(self.tok, n, None)}


# Code, prose, digits, accents, CJK and emoji: tokenizers of equal vocabularies but other merge
# rules or normalisation split it differently.
_PROBE = ("def distill(teacher, student):\n    return 'Minitron' * 3  # ünïcode\n\t"
          "2026-11-29: 3.14159 x 42, naïve café, 日本語, 🙂 Ελληνικά  trailing  ")


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """The identity of a tokenizer: a sha256 of its kind, vocabulary (with the BPE scores a
    sentencepiece model ranks merges by), end-of-document id and its encoding of a probe text.
    Content, not files: the copy in a checkpoint (re-saved, another path) has the same one.
    What a data set records of the tokenizer that wrote it; ``same_tokenizer`` compares it."""
    if tokenizer._fingerprint is None:
        what = [tokenizer.kind, tokenizer.vocab_size, tokenizer.eod, tokenizer.pieces(),
                tokenizer.encode(_PROBE)]
        blob = json.dumps(what, ensure_ascii=False, separators=(",", ":")).encode()
        tokenizer._fingerprint = hashlib.sha256(blob).hexdigest()
    return tokenizer._fingerprint


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether ``a`` and ``b`` are the same tokenizer (equal ``tokenizer_fingerprint``s): the
    one test of tokenizer identity (data sets, teacher/student, merge inputs, target/draft)."""
    return a is b or tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def tokenizer_label(tokenizer: Tokenizer) -> str:
    """How messages name a tokenizer: its file or directory, kind, size and fingerprint."""
    return (f"{tokenizer.path or 'in memory'} ({tokenizer.kind}, {tokenizer.vocab_size} tokens, "
            f"fingerprint {tokenizer_fingerprint(tokenizer)[:12]})")


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer at ``path``, encoding as its source does: a ``.model`` file, or a directory
    with ``tokenizer.model`` but no ``tokenizer.json``, -> sentencepiece itself (transformers'
    conversion of a ``.model`` need not split as sentencepiece does); a directory with
    ``tokenizer.json`` or only ``tokenizer_config.json`` -> Hugging Face."""
    p = Path(path)
    if p.is_file():
        return _parsed(SentencePieceTokenizer, p, p)
    if p.is_dir():
        if (p / "tokenizer.json").exists():
            return _parsed(HFTokenizer, p, p / "tokenizer.json")
        if (p / "tokenizer.model").exists():
            if (p / "tokenizer_config.json").exists():
                log.warning("%s: encoding with sentencepiece's tokenizer.model; the chat template "
                            "and special tokens of tokenizer_config.json are not used", p)
            return _parsed(SentencePieceTokenizer, p / "tokenizer.model", p / "tokenizer.model")
        if (p / "tokenizer_config.json").exists():
            return _parsed(HFTokenizer, p, p / "tokenizer_config.json")
        raise ConfigError(
            f"data.tokenizer={str(path)!r} holds no tokenizer.model or tokenizer.json"
        )
    raise ConfigError(f"data.tokenizer={str(path)!r} does not exist")


def _parsed(cls: type[Tokenizer], arg: Path, shown: Path) -> Tokenizer:
    """``cls(arg)``, with a one-line error naming the file when it does not parse."""
    try:
        return cls(arg)  # type: ignore[call-arg]
    except ConfigError:
        raise
    except Exception as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"tokenizer file {str(shown)!r} does not parse ({cause})") from None


_USER_SYMBOLS = ["\n", "    "]
FIXED_PIECES = 256 + 3 + len(_USER_SYMBOLS)
"""Pieces of every trained vocabulary besides the text's characters and merges: the 256 byte
pieces, unk/bos/eos and the user symbols."""


def train_sentencepiece(documents: Iterable[str], vocab_size: int,
                        out_file: str | os.PathLike[str],
                        field: str = "vocab_size") -> SentencePieceTokenizer:
    """Train a byte-fallback BPE model that round-trips text exactly (no normalisation).
    Errors name ``vocab_size`` as ``field`` (the flag or recipe key that gave it).

    Training reads lines; code indentation survives as whitespace-only pieces.
    """
    import sentencepiece as spm

    if vocab_size <= FIXED_PIECES:
        raise ConfigError(f"{field}={vocab_size} must be above {FIXED_PIECES}: every vocabulary "
                          f"holds {FIXED_PIECES} fixed pieces (256 bytes, unk/bos/eos, "
                          f"{len(_USER_SYMBOLS)} user symbols), then the text's characters")
    out_file = Path(out_file)
    made = not out_file.parent.exists()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        _train_sentencepiece(spm, documents, vocab_size, out_file, field)
    except (RuntimeError, ConfigError) as e:
        # Nothing half-written: the directory made for the model goes with the failed run.
        if made and not any(out_file.parent.iterdir()):
            out_file.parent.rmdir()
        if isinstance(e, ConfigError):
            raise
        too_high = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value "
                             r"<= (\d+)", str(e))
        too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if too_high is None and too_low is None:
            raise
        if too_low is not None:
            raise ConfigError(f"{field}={vocab_size} is too small for this text: its characters "
                              f"and the fixed pieces need at least {too_low[1]}") from None
        raise ConfigError(f"{field}={vocab_size} is too large for this text: sentencepiece "
                          f"allows at most {too_high[1]}") from None
    log.info("trained sentencepiece BPE tokenizer (vocab %d) -> %s", vocab_size, out_file)
    return SentencePieceTokenizer(out_file)


def _train_sentencepiece(spm: Any, documents: Iterable[str], vocab_size: int,
                         out_file: Path, field: str) -> None:
    with tempfile.TemporaryDirectory(dir=out_file.parent) as tmp:
        text_path = Path(tmp) / "corpus.txt"
        text = False
        with open(text_path, "w", encoding="utf-8") as f:
            for doc in documents:
                text = text or doc.strip() != ""
                f.write(doc)
                if not doc.endswith("\n"):
                    f.write("\n")
        if not text:  # sentencepiece's own message is an internal assertion
            raise ConfigError(f"{field}: the inputs hold no text to train the tokenizer on")
        prefix = Path(tmp) / "spm"
        spm.SentencePieceTrainer.train(
            input=str(text_path), model_prefix=str(prefix), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, character_coverage=1.0,
            max_sentence_length=16384, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            pad_id=-1, unk_id=0, bos_id=1, eos_id=2, user_defined_symbols=_USER_SYMBOLS,
            num_threads=os.cpu_count() or 1, minloglevel=2,
        )
        os.replace(prefix.with_suffix(".model"), out_file)

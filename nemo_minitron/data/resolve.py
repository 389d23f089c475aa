"""Where a stage's training data comes from: the recipe's indexed dataset and tokenizer, or the
embedded corpus built on first use.

A checkpoint reads its own tokens: when a verb loads one, its tokenizer builds the embedded
corpus, and an indexed dataset (``data.path``) written by another tokenizer (its
``<prefix>.tokenizer.json`` record, ``data.indexed``) or a ``data.tokenizer`` that differs from
it is refused. Identity is ``tokenizer_fingerprint``.
"""

from __future__ import annotations

from nemo_minitron.config import ConfigError, DataConfig
from nemo_minitron.data.embedded import prepare_embedded
from nemo_minitron.data.indexed import check_indexed_prefix, max_token_id, tokenizer_record
from nemo_minitron.data.tokenizer import (
    Tokenizer,
    load_tokenizer,
    same_tokenizer,
    tokenizer_fingerprint,
    tokenizer_label,
)
from nemo_minitron.utils.logging import get_logger

log = get_logger("data.resolve")

_unrecorded: set[str] = set()  # data sets without a tokenizer record, warned about once


def check_prefix_tokenizer(prefix: str, tokenizer: Tokenizer, field: str = "data.path",
                           whose: str = "the checkpoint's tokenizer") -> None:
    """One-line error unless the indexed dataset ``prefix`` was written by ``tokenizer``; a
    dataset without a tokenizer record is warned about once (it cannot be checked)."""
    record = tokenizer_record(prefix)
    if record is None:
        if prefix not in _unrecorded:
            _unrecorded.add(prefix)
            log.warning("%s=%r has no tokenizer record (%s.tokenizer.json): whether %s %s wrote "
                        "it cannot be checked; `nemo-minitron data` writes one", field, prefix,
                        prefix, whose, tokenizer_label(tokenizer))
        return
    if record["fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"{field}={prefix!r} was tokenized by {record.get('tokenizer')}, not "
                          f"by {whose} {tokenizer_label(tokenizer)}: rebuild it with "
                          f"`nemo-minitron data ... --tokenizer "
                          f"{tokenizer.path or 'THAT_TOKENIZER'}`")


def check_data(data: DataConfig, tokenizer: Tokenizer | None = None) -> Tokenizer | None:
    """The checks of ``resolve_data`` that need no parallel runtime (so a verb can refuse bad
    data before starting it): ``data.tokenizer`` agrees with ``tokenizer`` (a checkpoint's),
    ``data.path`` exists and was written by the tokenizer that will read it. Returns that
    tokenizer (None: the embedded corpus' own, trained on first use)."""
    if data.path is not None:
        check_indexed_prefix(data.path)
        if tokenizer is None and data.tokenizer is None:
            raise ConfigError("data.tokenizer must be set when data.path is set")
    if data.tokenizer is not None:
        named = load_tokenizer(data.tokenizer)
        if tokenizer is not None and not same_tokenizer(named, tokenizer):
            raise ConfigError(f"data.tokenizer={data.tokenizer!r} is "
                              f"{tokenizer_label(named)}, not the checkpoint's tokenizer "
                              f"{tokenizer_label(tokenizer)}: a checkpoint reads its own "
                              "tokens (drop data.tokenizer)")
        tokenizer = tokenizer or named
    if data.path is not None:
        assert tokenizer is not None
        whose = "data.tokenizer" if data.tokenizer is not None else "the checkpoint's tokenizer"
        check_prefix_tokenizer(data.path, tokenizer, whose=whose)
    return tokenizer


def check_vocab(data: DataConfig, tokenizer: Tokenizer, vocab_size: int, who: str) -> None:
    """One-line error when the data hold token ids outside a model's (padded) vocabulary of
    ``vocab_size``: ``data.path``'s largest id, or ``tokenizer``'s (it builds the embedded
    corpus). Before the first forward, which would fail in the embedding."""
    if data.path is not None:
        top, what = max_token_id(data.path), f"data.path={data.path!r} holds token id"
    else:
        top, what = tokenizer.vocab_size - 1, f"the tokenizer {tokenizer_label(tokenizer)} " \
                                              "writes token ids up to"
    if top >= vocab_size:
        raise ConfigError(f"{what} {top}, outside the vocabulary of {who} ({vocab_size} "
                          "tokens): its embedding has no row for them")


def resolve_data(data: DataConfig, tokenizer: Tokenizer | None = None) -> tuple[str, Tokenizer]:
    """The dataset prefix and the tokenizer (``tokenizer`` when given, e.g. a checkpoint's):
    ``data.path``, or the embedded corpus tokenized by that tokenizer (or ``data.tokenizer``,
    else its own); ``check_data``'s errors."""
    tokenizer = check_data(data, tokenizer)
    if data.path is None:
        prefix, tok_file = prepare_embedded(data, tokenizer)
        return prefix, tokenizer or load_tokenizer(tok_file)
    assert tokenizer is not None
    return data.path, tokenizer

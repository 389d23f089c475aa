"""Where a stage's training data comes from: the recipe's indexed dataset and tokenizer, or the
embedded corpus built on first use."""

from __future__ import annotations

from nemo_minitron.config import ConfigError, DataConfig
from nemo_minitron.data.embedded import prepare_embedded
from nemo_minitron.data.indexed import check_indexed_prefix
from nemo_minitron.data.tokenizer import Tokenizer, load_tokenizer


def resolve_data(data: DataConfig, tokenizer: Tokenizer | None = None) -> tuple[str, Tokenizer]:
    """The dataset prefix and the tokenizer (``tokenizer`` when given, e.g. a checkpoint's):
    ``data.path``'s, or the embedded corpus'."""
    if data.path is None:
        prefix, tok_file = prepare_embedded(data)
        return prefix, tokenizer or load_tokenizer(data.tokenizer or tok_file)
    check_indexed_prefix(data.path)
    if tokenizer is None and data.tokenizer is None:
        raise ConfigError("data.tokenizer must be set when data.path is set")
    return data.path, tokenizer or load_tokenizer(data.tokenizer)  # type: ignore[arg-type]

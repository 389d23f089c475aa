"""Data and model settings the tests share: a small embedded corpus, a tiny model, tokenizers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from nemo_minitron.data.corpus import read_documents, stdlib_files

SMALL_DATA = {"tokenizer_vocab_size": 1000, "corpus_max_bytes": 1_500_000}


TINY_MODEL = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=64",
]

MOE_MODEL = ["model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
             "model.moe_aux_loss_coeff=0.01", "model.moe_z_loss_coeff=0.001"]
"""``TINY_MODEL``'s MLPs as 4 routed experts (top-2) of width 32, with router losses."""


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


# Code, a word at the very start, leading/trailing/repeated spaces, tabs, digits, unicode
# (accents, CJK, emoji, Greek, Cyrillic), CRLF and blank lines.
MIXED = ("def foo(x):\n    return x ** 2  # squares 12345 and 3.14159\n\n"
         "  Leading spaces,\ttabs and trailing   \n"
         "Ünïcödé façade, naïve café; 日本語のテキスト 🙂👍🏽 Ελληνικά русский\r\nend ")


TEXTS = (MIXED, "word", "  two leading spaces 0123456789", " one")


CHATML = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@contextlib.contextmanager
def kept_records(logger: str) -> Iterator[list[logging.LogRecord]]:
    """The records ``logger`` emits inside the block (the package logger does not propagate
    to pytest's capture)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    logging.getLogger(logger).addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger(logger).removeHandler(handler)


def _examples() -> list[dict]:
    """Short Alpaca and chat examples of varied lengths (several fit one 64-token window)."""
    out: list[dict] = []
    for i in range(40):
        a, b = 3 * i + 1, 7 * i % 13
        if i % 5 == 4:
            out.append({"messages": [{"role": "user", "content": f"What is {a} times {b}?"},
                                     {"role": "assistant", "content": f"{a * b}"}]})
        elif i % 3 == 0:
            out.append({"instruction": "Add the numbers.", "input": f"{a} {b}",
                        "output": f"{a} + {b} = {a + b}"})
        else:
            out.append({"instruction": f"Add {a} and {b}.", "output": str(a + b)})
    return out

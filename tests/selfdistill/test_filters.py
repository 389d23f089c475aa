"""Rewrite filters on handcrafted rewrites (table-driven), the rewrite prompt, and the merge:
a rejected example keeps its original answer, the output keeps the input order."""

from __future__ import annotations

import json

import pytest

from nemo_minitron.config import ConfigError
from nemo_minitron.data.instruct import parse_example
from nemo_minitron.selfdistill.filters import (
    code_verifier,
    load_verifier,
    math_verifier,
    mentions_reference,
    rejection,
)
from nemo_minitron.selfdistill.prompt import (
    DEFAULT_REWRITE_TEMPLATE,
    check_template,
    rewrite_messages,
)

REF_CODE = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("rewrite, instruction, reference, expected", [
    ("The capital is Paris.", "Capital of France?", "Paris", False),
    ("As the reference answer says, Paris.", "Capital of France?", "Paris", True),
    ("Based on the Reference Response: Paris", "Capital of France?", "Paris", True),
    ("Here is your response: Paris", "Capital of France?", "Paris", True),
    ("Using it as a guide, Paris.", "Capital of France?", "Paris", True),
    ("The original answer was right: Paris", "Capital of France?", "Paris", True),
    # The task itself talks about reference answers: using the phrase is not a give-away.
    ("A reference answer is a model solution.", "What is a reference answer?", "A model "
     "solution.", False),
])
def test_mentions_reference(rewrite, instruction, reference, expected):
    assert mentions_reference(rewrite, instruction, reference) is expected


@pytest.mark.parametrize("rewrite, reference, expected", [
    ("So she has 12 apples.", "12", True),
    ("2 + 10 = 12.0", "The answer is 12.", True),
    ("It costs $1,250.50 in total", "#### 1250.5", True),
    ("first 12, then 13", "12", False),  # the last number counts
    ("The result is -4", "4", False),
    ("twelve", "12", False),  # no number in the rewrite
    ("12", "twelve", False),  # no number in the reference: nothing to check against
])
def test_math_verifier(rewrite, reference, expected):
    assert math_verifier("q", reference, rewrite) is expected


@pytest.mark.parametrize("rewrite, reference, expected", [
    (REF_CODE, REF_CODE, True),
    ("```python\ndef add(x, y):\n    return y + x\n```", REF_CODE, True),
    ("Sure:\n```\ndef helper():\n    pass\n\ndef add(a, b):\n    return a + b\n```\nDone.",
     REF_CODE, True),  # extra helpers are fine
    ("def plus(a, b):\n    return a + b\n", REF_CODE, False),  # another name
    ("def add(a, b):\n    return a +\n", REF_CODE, False),  # does not parse
    ("add = lambda a, b: a + b\n", REF_CODE, False),  # not a def
    ("    def add(self, b):\n        return b\n", "    def add(self, b):\n        return 1\n",
     True),  # indented methods are dedented
    ("class Add:\n    pass\n", "class Add:\n    x = 1\n", True),
    ("def f(): pass", "this is not python (", False),
])
def test_code_verifier(rewrite, reference, expected):
    assert code_verifier("write add", reference, rewrite) is expected


@pytest.mark.parametrize("rewrite, truncated, verifier, expected", [
    ("The answer is 12.", False, None, None),
    ("The answer is 12.", True, None, "truncated"),
    ("   \n", False, None, "empty"),
    ("Like the reference answer: 12", False, None, "mentions_reference"),
    ("The answer is 13.", False, math_verifier, "verifier"),
    ("The answer is 12.", False, math_verifier, None),
    ("", True, math_verifier, "truncated"),  # the first failed rule names the rejection
])
def test_rejection_order(rewrite, truncated, verifier, expected):
    assert rejection(rewrite, truncated=truncated, instruction="How many?",
                     reference="12", verifier=verifier) == expected


def user_verifier(instruction: str, reference: str, rewrite: str) -> bool:
    return rewrite.startswith(reference)


def test_load_verifier():
    assert load_verifier("math") is math_verifier and load_verifier("code") is code_verifier
    assert load_verifier(None) is None
    assert load_verifier(f"{__name__}:user_verifier") is user_verifier
    for spec, needle in [("no_such_module_xyz:f", "cannot be imported: ModuleNotFoundError"),
                         (f"{__name__}:missing", "cannot be imported: AttributeError"),
                         ("json", "must be one of math, code or module:function"),
                         (f"{__name__}:REF_CODE", "is not callable")]:
        with pytest.raises(ConfigError, match=needle):
            load_verifier(spec)


@pytest.mark.parametrize("template, needle", [
    ("{instruction} {answer}", "unknown field {answer}"),
    ("{instruction} only", "needs the field {reference}"),
    ("{instruction} {reference} {", "literal braces"),
])
def test_bad_template(template, needle):
    with pytest.raises(ConfigError, match=needle):
        check_template(template)


def test_rewrite_prompt_replaces_the_last_user_turn():
    chat = parse_example({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]}, "x")
    msgs = rewrite_messages(chat)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[:3] == chat.messages[:3]
    assert msgs[3]["content"] == DEFAULT_REWRITE_TEMPLATE.format(instruction="2+2?",
                                                                 reference="4")
    assert "Using the reference answer as a guide" in msgs[3]["content"]
    alpaca = parse_example({"instruction": "Add", "input": "1 and 2", "output": "3"}, "x")
    assert rewrite_messages(alpaca, "Q: {instruction}\nA: {reference}") == [
        {"role": "user", "content": "Q: Add\n\n1 and 2\nA: 3"}]


class WordTokenizer:
    """Whitespace words <-> ids; id 0 is the stop token."""

    eod = 0

    def __init__(self) -> None:
        self.words = ["</s>"]

    def encode(self, text: str) -> list[int]:
        out = []
        for w in text.split():
            if w not in self.words:
                self.words.append(w)
            out.append(self.words.index(w))
        return out

    def decode(self, ids) -> str:
        return " ".join(self.words[i] for i in ids)


def test_merge_keeps_the_original_answer_of_rejected_examples(tmp_path):
    from nemo_minitron.selfdistill.merge import merge
    from nemo_minitron.selfdistill.stage import SelfDistillConfig, rewrite_sampling

    tok = WordTokenizer()
    rows = [  # (example, generated rewrite text, stopped?)
        ({"instruction": "add 1 and 2", "output": "it is 3"}, "one plus two is 3", True),
        ({"messages": [{"role": "user", "content": "add 2 and 2"},
                       {"role": "assistant", "content": "4"}]}, "see the reference answer 4",
         True),
        ({"instruction": "add 5 and 5", "output": "10"}, "ten is 11", True),
        ({"instruction": "add 1 and 1", "output": "2"}, "the sum is 2 and then", False),
        ({"instruction": "add 3 and 3", "output": "6"}, None, False),  # prompt too long
        ({"instruction": "add 0 and 7", "output": "7"}, "", True),
        ({"messages": [{"role": "user", "content": "add 4 and 4"},
                       {"role": "assistant", "content": "8"}]}, "four and four make 8", True),
    ]
    examples = [parse_example(obj, "t", n + 1) for n, (obj, _, _) in enumerate(rows)]
    # generate drops the stop token; a rewrite that never stopped fills max_new_tokens (6)
    generated = {i: tok.encode(text) for i, (_, text, stop) in enumerate(rows)
                 if text is not None}
    assert all((len(ids) == 6) == (not rows[i][2]) for i, ids in generated.items())
    batches = [[0, 1, 2], [3, 5, 6]]
    parts = tmp_path / "out.jsonl.parts"
    parts.mkdir()
    for k, batch in enumerate(batches):
        (parts / f"batch_{k:06d}.jsonl").write_text("".join(
            json.dumps({"index": i, "ids": generated[i]}) + "\n" for i in batch))
    cfg = SelfDistillConfig(verifier="math", sampling=rewrite_sampling(max_new_tokens=6))
    stats = merge(examples, [[1]] * len(rows), batches, parts, tok, cfg, math_verifier,
                  tmp_path / "out.jsonl", tmp_path / "out.stats.json")
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    kept = {0, 6}
    for i, ((obj, text, _), line) in enumerate(zip(rows, got)):
        assert line == (examples[i].with_response(text).source if i in kept else obj), i
    assert stats["kept"] == 2 and stats["examples"] == 7
    assert stats["rejected_by_reason"] == {"too_long": 1, "truncated": 1, "empty": 1,
                                           "mentions_reference": 1, "verifier": 1}
    assert [r["line"] for r in stats["rejections"]] == [2, 3, 4, 5, 6]
    assert stats["mean_tokens"]["kept_rewrite"] == (5 + 5) / 2  # words of the kept rewrites
    assert got[0]["output"] == "one plus two is 3"
    assert got[6]["messages"][-1]["content"] == "four and four make 8"
    assert json.loads((tmp_path / "out.stats.json").read_text()) == stats
    assert not parts.exists()

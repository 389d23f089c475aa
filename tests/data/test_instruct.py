"""Instruction data: the JSONL reader (formats and a bad-input table), chat templates against
``transformers.apply_chat_template``, response-only masks, padding/packing windows, the split.
The model-level checks (loss masking and packing on a real GPTModel) are in
tests/train/test_sft.py."""

from __future__ import annotations

import json

import pytest
import torch

from nemo_minitron.config import ConfigError
from nemo_minitron.data import instruct
from nemo_minitron.data.instruct import (
    Example,
    build_sft_dataset,
    parse_example,
    read_jsonl,
    render_example,
    render_prompt,
    split_examples,
    tokenize_example,
    write_jsonl,
)
from nemo_minitron.data.tokenizer import SentencePieceTokenizer, load_tokenizer
from tests.helpers.data import CHATML, _hf_tokenizer_dir

ALPACA = {"instruction": "Add the numbers.", "input": "1 2", "output": "3"}
CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."},
                     {"role": "user", "content": "Name a colour."},
                     {"role": "assistant", "content": "Blue."}]}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE tokenizer directory whose tokenizer_config.json has a chat template."""
    path = _hf_tokenizer_dir(tmp_path_factory.mktemp("hf") / "tok")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHATML
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def sp_tok(embedded_paths) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(embedded_paths[1])


def _write(tmp_path, lines: list[str] | bytes):
    p = tmp_path / "d.jsonl"
    if isinstance(lines, bytes):
        p.write_bytes(lines)
    else:
        p.write_text("".join(x + "\n" for x in lines))
    return p


def test_reads_both_formats_and_writes_back_in_order(tmp_path):
    p = _write(tmp_path, [json.dumps(ALPACA), "", json.dumps(CHAT),
                          json.dumps({"instruction": "Say hi.", "output": "hi"})])
    ex = read_jsonl(p)
    assert [e.fmt for e in ex] == ["alpaca", "chat", "alpaca"]
    assert [e.line for e in ex] == [1, 3, 4]
    assert ex[0].prompt_messages == [{"role": "user", "content": "Add the numbers.\n\n1 2"}]
    assert ex[0].response == "3"
    assert ex[1].response == "Blue." and len(ex[1].prompt_messages) == 4
    assert ex[2].prompt_messages[0]["content"] == "Say hi."
    new = [ex[0].with_response("three"), ex[1].with_response("Red."), ex[2]]
    assert ex[0].source["output"] == "3"  # the copy, not the original, changed
    out = tmp_path / "out.jsonl"
    write_jsonl(out, new)
    back = [json.loads(x) for x in out.read_text().splitlines()]
    assert back[0] == {**ALPACA, "output": "three"}
    assert back[1]["messages"][-1] == {"role": "assistant", "content": "Red."}
    assert back[1]["messages"][:-1] == CHAT["messages"][:-1]
    assert back[2] == json.loads(p.read_text().splitlines()[3])
    assert [e.response for e in read_jsonl(out)] == ["three", "Red.", "hi"]
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp file left


BAD = [
    ("not json", ["{\"instruction\": 1"], r"d\.jsonl:1: not JSON"),
    ("not an object", ["[1, 2]"], r":1: expected a JSON object"),
    ("no fields", [json.dumps(ALPACA), json.dumps({"text": "x"})],
     r":2: needs 'instruction' and 'output'"),
    ("no output", [json.dumps({"instruction": "x"})], r":1: Alpaca field 'output'"),
    ("output not str", [json.dumps({"instruction": "x", "output": 3})], r"'output' must be"),
    ("empty instruction", [json.dumps({"instruction": " ", "output": "y"})], r"is empty"),
    ("input not str", [json.dumps({"instruction": "x", "input": [1], "output": "y"})],
     r"'input' must be a string"),
    ("unknown role", [json.dumps({"messages": [{"role": "wizard", "content": "x"},
                                               {"role": "assistant", "content": "y"}]})],
     r":1: messages\[0\] has unknown role 'wizard'"),
    ("last not assistant", [json.dumps({"messages": [{"role": "user", "content": "x"}]})],
     r"last message must be the assistant"),
    ("response only", [json.dumps({"messages": [{"role": "assistant", "content": "x"}]})],
     r"needs a prompt turn"),
    ("content not str", [json.dumps({"messages": [{"role": "user", "content": None},
                                                  {"role": "assistant", "content": "y"}]})],
     r"messages\[0\] must be an object"),
    ("empty messages", [json.dumps({"messages": []})], r"non-empty list"),
    ("empty file", ["", "  "], r"the data set is empty"),
    ("bad utf-8", b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff"}\n',
     r":2: not valid UTF-8"),
]


@pytest.mark.parametrize("lines,pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_error(tmp_path, lines, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        read_jsonl(_write(tmp_path, lines))
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_hf_chat_template_matches_transformers(hf_dir):
    """The tokenizer's own template, rendered in our sandbox, equals transformers'
    ``apply_chat_template``; the response text is what follows the prompt in the full chat."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    tok = load_tokenizer(hf_dir)
    assert tok.chat_template == CHATML
    for obj in (ALPACA, CHAT):
        ex = parse_example(obj, "x")
        want = ref.apply_chat_template(ex.prompt_messages, tokenize=False,
                                       add_generation_prompt=True)
        assert render_prompt(tok, ex.prompt_messages) == want
        prompt, response = render_example(tok, ex)
        full = ref.apply_chat_template(ex.messages, tokenize=False)
        assert prompt + response == full
        assert response == ex.response + "<|im_end|>\n"


def test_template_errors_and_sandbox(hf_dir):
    tok = load_tokenizer(hf_dir)
    msgs = [{"role": "tool", "content": "x"}]
    with pytest.raises(ConfigError, match="chat template: unknown role tool"):
        render_prompt(tok, msgs)
    # The template comes from an untrusted file: no attribute walking to Python internals.
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ConfigError, match="chat template:"):
        render_prompt(tok, [{"role": "user", "content": "x"}], evil)
    with pytest.raises(ConfigError, match="chat template:"):
        render_prompt(tok, [{"role": "user", "content": "x"}], "{% for %}")


def test_default_template(sp_tok):
    assert sp_tok.chat_template is None
    ex = parse_example(CHAT, "x")
    prompt, response = render_example(sp_tok, ex)
    assert prompt == ("### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello.\n\n"
                      "### User:\nName a colour.\n\n### Assistant:\n")
    assert response == "Blue."


@pytest.mark.parametrize("which", ["sp", "hf"])
def test_loss_mask_covers_the_response_and_eod_only(which, sp_tok, hf_dir):
    tok = sp_tok if which == "sp" else load_tokenizer(hf_dir)
    ex = parse_example(CHAT, "x")
    t = tokenize_example(tok, ex)
    prompt, response = render_example(tok, ex)
    n_prompt = len(tok.encode(prompt))
    assert t.ids[:n_prompt] == tok.encode(prompt)
    assert t.loss == [0] * n_prompt + [1] * (len(t.ids) - n_prompt)
    assert tok.decode(t.ids[n_prompt:]).startswith("Blue.")
    assert t.ids.count(tok.eod) >= 1 and tok.eod in t.ids[n_prompt:]
    if which == "sp":
        assert t.ids[-1] == tok.eod  # appended: the default template has no end-of-turn text


def test_padding_and_packing_windows(sp_tok):
    exs = [parse_example({"instruction": f"Say {w}.", "output": w * k}, "x")
           for w, k in (("a", 3), ("bb", 5), ("c", 1), ("dd", 2))]
    toks = [tokenize_example(sp_tok, e) for e in exs]
    seq = max(len(t.ids) for t in toks) * 2
    padded = build_sft_dataset(exs, sp_tok, seq, pack=False)
    packed = build_sft_dataset(exs, sp_tok, seq, pack=True)
    assert len(padded) == 4 and len(packed) < 4
    assert sum(len(g) for g in packed.windows.examples) == 4
    for ds in (padded, packed):
        for w, group in enumerate(ds.windows.examples):
            s = ds[w]
            assert s["tokens"].shape == (seq,) and s["labels"].shape == (seq,)
            pos, want_mask, want_pos = 0, torch.zeros(seq), []
            for i in group:
                t = toks[i]
                assert s["tokens"][pos:pos + len(t.ids) - 1].tolist() == t.ids[:-1]
                # label j = token j+1; loss exactly where that token is a response token
                want_mask[pos:pos + len(t.ids) - 1] = torch.tensor(t.loss[1:], dtype=torch.float)
                want_pos += list(range(len(t.ids)))
                pos += len(t.ids)
            assert torch.equal(s["loss_mask"], want_mask)
            assert s["position_ids"][:pos].tolist() == want_pos[:seq][:pos]
            assert s["tokens"][pos:].eq(sp_tok.eod).all()
            assert ("segment_ids" in s) == (ds is packed)


def test_attention_mask_is_block_diagonal_causal():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = instruct.sft_attention_mask(seg)[0, 0]
    allowed = ~m
    for q in range(6):
        for k in range(6):
            assert bool(allowed[q, k]) == (k <= q and seg[0, q] == seg[0, k])


def test_too_long_examples_are_skipped_or_rejected(sp_tok):
    short = parse_example({"instruction": "x", "output": "y"}, "x")
    long = parse_example({"instruction": "x", "output": "word " * 200}, "x")
    ds = build_sft_dataset([short, long, short], sp_tok, 32, pack=False)
    assert ds.windows.skipped == 1 and len(ds) == 2
    with pytest.raises(ConfigError, match="every example is longer than model.seq_length"):
        build_sft_dataset([long], sp_tok, 32, pack=False, name="train data")


def test_split_is_deterministic_and_keeps_groups_apart():
    exs = [Example(messages=[{"role": "user", "content": str(i)},
                             {"role": "assistant", "content": "x"}],
                   fmt="chat", source={"i": i, "file": f"f{i % 7}"}, line=i + 1)
           for i in range(70)]
    a = split_examples(exs, 0.2, seed=3)
    b = split_examples(exs, 0.2, seed=3)
    assert [e.line for e in a[0]] == [e.line for e in b[0]]
    assert len(a[1]) == 14 and len(a[0]) == 56
    assert [e.line for e in a[1]] == sorted(e.line for e in a[1])  # input order kept
    c = split_examples(exs, 0.2, seed=4)
    assert [e.line for e in c[1]] != [e.line for e in a[1]]
    tr, va = split_examples(exs, 0.3, seed=0, group=lambda e: e.source["file"])
    assert {e.source["file"] for e in tr}.isdisjoint({e.source["file"] for e in va})
    assert len(va) >= 21
    assert split_examples(exs, 0.0, seed=0)[1] == []
    with pytest.raises(ConfigError, match="valid_fraction"):
        split_examples(exs, 1.0, seed=0)

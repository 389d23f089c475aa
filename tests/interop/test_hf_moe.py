"""Hugging Face mixtures of experts against transformers itself: tiny random Mixtral, Qwen2-MoE
and Qwen3-MoE models (4 experts, top-2; Qwen2-MoE with its gated shared expert and QKV bias,
with and without ``norm_topk_prob``; Qwen3-MoE with its query/key norms, head_dim 32 != hidden /
heads) give our model transformers' logits after import (fp32, 1e-5),
also imported under PP=2 and under TP=2; the exported directory loads with
``from_pretrained`` and gives our logits back. A Mixtral and the Qwen3-MoE are saved with their
experts fused (``save_original_format=False``: ``experts.gate_up_proj``, ``down_proj``, and
Mixtral's router as ``mlp.gate``), which import reads as well."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.dist import spawn
from tests.interop.hfmodels import hf_logits, save_hf_model, tokens

ATOL = 1e-5
# The two Qwen2-MoE models share their weights (seed) and differ in the router's normalisation.
MODELS = {"mixtral": ("mixtral", {"seed": 0}), "qwen2_moe": ("qwen2_moe", {"seed": 1}),
          "qwen2_moe_norm": ("qwen2_moe", {"seed": 1, "norm_topk_prob": True}),
          "qwen3_moe": ("qwen3_moe", {"seed": 2, "norm_topk_prob": True, "head_dim": 32,
                                      "original_format": False}),
          "mixtral_fused": ("mixtral", {"seed": 3, "original_format": False})}
ARCH = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
        "qwen2_moe_norm": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
        "mixtral_fused": "MixtralForCausalLM"}
FUSED = ("qwen3_moe", "mixtral_fused")


def _logits(ckpt: Path):
    from nemo_minitron.checkpoint.io import load_model_config, load_weights
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits

    model = build_model(load_model_config(ckpt))
    load_weights(ckpt, model)
    return forward_logits(model, tokens())


def single_job(root: str) -> None:
    from nemo_minitron.interop.hf_export import export_hf
    from nemo_minitron.interop.hf_import import import_hf

    r = Path(root)
    for name in MODELS:
        import_hf(r / f"hf_{name}", r / f"ck_{name}")
        torch.save(_logits(r / f"ck_{name}"), r / f"ours_{name}.pt")
        export_hf(r / f"ck_{name}", r / f"exported_{name}")


def parallel_job(root: str) -> None:
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.interop.hf_import import import_hf

    r = Path(root)
    import_hf(r / "hf_qwen2_moe", r / "ck_pp2", ParallelConfig(pipeline_model_parallel_size=2))
    outs = {"pp2": _logits(r / "ck_pp2")}
    import_hf(r / "hf_qwen2_moe", r / "ck_tp2", ParallelConfig(tensor_model_parallel_size=2))
    outs["tp2"] = _logits(r / "ck_tp2")  # every expert's [gate; up] split per TP rank
    if int(os.environ["RANK"]) == 1:
        for layout, logits in outs.items():
            torch.save(logits, r / f"ours_{layout}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_moe")
    for name, (arch, kw) in MODELS.items():
        save_hf_model(root / f"hf_{name}", arch, **kw)
    spawn(single_job, 1, str(root))
    spawn(parallel_job, 2, str(root))
    return root


@pytest.mark.dist
@pytest.mark.parametrize("name", MODELS)
def test_moe_import_matches_transformers_and_exports_back(runs, name):
    ours = torch.load(runs / f"ours_{name}.pt")
    ref = hf_logits(runs / f"hf_{name}", tokens())
    assert ours.shape == ref.shape == (2, 16, 160)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    out = runs / f"exported_{name}"
    assert json.loads((out / "config.json").read_text())["architectures"] == [ARCH[name]]
    torch.testing.assert_close(hf_logits(out, tokens()), ours, atol=ATOL, rtol=0)


@pytest.mark.dist
def test_moe_import_pp2_and_tp2_equal_transformers(runs):
    ref = hf_logits(runs / "hf_qwen2_moe", tokens())
    for layout in ("pp2", "tp2"):
        torch.testing.assert_close(torch.load(runs / f"ours_{layout}.pt"), ref, atol=ATOL,
                                   rtol=0, msg=lambda m, n=layout: f"{n}: {m}")


def test_norm_topk_prob_changes_the_model(runs):
    # The two routers give different logits on the same weights: the check above has teeth.
    a = hf_logits(runs / "hf_qwen2_moe", tokens())
    b = hf_logits(runs / "hf_qwen2_moe_norm", tokens())
    assert (a - b).abs().max() > 1e-3


def test_fused_experts_are_stored_fused_and_checked(runs, tmp_path):
    """The fused directories really hold fused experts (the import test above reads them), and
    a fused tensor missing or of the wrong shape is a one-line error naming it."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from nemo_minitron.config import ConfigError
    from nemo_minitron.interop.hf_import import inspect_hf

    for name in FUSED:
        with safe_open(runs / f"hf_{name}" / "model.safetensors", "pt") as f:
            keys = set(f.keys())
        assert "model.layers.0.mlp.experts.gate_up_proj" in keys
        assert not any(".experts.0." in k for k in keys)
    bad = tmp_path / "bad"
    shutil.copytree(runs / "hf_mixtral_fused", bad)
    sd = load_file(bad / "model.safetensors")
    key = "model.layers.1.mlp.experts.down_proj"
    sd[key] = sd[key][:, :, :-1].contiguous()
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=f"tensor '{key}' has shape"):
        inspect_hf(bad)
    del sd[key]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=f"lacks tensor '{key}'"):
        inspect_hf(bad)

"""``nemo_minitron.merge`` in memory against the ``merge`` verb (itself equal to mergekit,
``test_merge.py``) on the same checkpoints, bit for bit, and against a torch-only SLERP formula
on single tensors.

One spawned process imports three tiny Llama checkpoints, runs the verb for every case, then
merges the same weights in memory (as state dicts and as models) and saves both."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.dist import spawn

LAYERS = 3
FILTER_T = [{"filter": "self_attn", "value": [0.1, 0.8, 0.3, 0.9]},
            {"filter": "mlp", "value": [0.9, 0.2, 0.6]},
            {"filter": "*", "value": 0.35}]
# name -> (the verb's arguments, the in-memory keywords, base, others)
CASES = {
    "slerp": (["merge.t=0.3"], {"t": 0.3}, "a", ("b",)),
    "slerp_filters": ([f"merge.t={json.dumps(FILTER_T)}"], {"t": FILTER_T}, "a", ("b",)),
    "linear": (["--method", "linear", "merge.weights=[0.7,0.3]"],
               {"method": "linear", "weights": [0.7, 0.3]}, "a", ("b",)),
    "task": (["--method", "task", "merge.weights=[0.6,0.4]", "merge.scale=0.8"],
             {"method": "task", "weights": [0.6, 0.4], "scale": 0.8}, "p", ("a", "b")),
    "task_slerp": (["--method", "task", "merge.combine=slerp", "merge.t=0.4"],
                   {"method": "task", "combine": "slerp", "t": 0.4}, "p", ("a", "b")),
}


def memory_job(root: str) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import nemo_minitron as nm
    from nemo_minitron.checkpoint.io import load_model
    from nemo_minitron.cli import main
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.interop.hf_import import import_hf
    from nemo_minitron.model.full_state import gather_full_state_dict
    from tests.interop.hfmodels import save_hf_model

    r = Path(root)
    for seed, x in enumerate("abp"):
        save_hf_model(r / f"hf_{x}", seed=seed, num_hidden_layers=LAYERS)
        import_hf(r / f"hf_{x}", r / f"ck_{x}")
    for name, (args, _, base, others) in CASES.items():
        argv = ["merge", "--base", str(r / f"ck_{base}"), "--out", str(r / f"ck_{name}"), *args]
        for o in others:
            argv += ["--other", str(r / f"ck_{o}")]
        assert main(argv) == 0, name
    models, sds = {}, {}
    for x in "abp":
        models[x], cfg, _ = load_model(r / f"ck_{x}", ParallelConfig())
        sds[x] = gather_full_state_dict(models[x])
    out = {"inputs": sds}
    for name, (_, kwargs, base, others) in CASES.items():
        out[f"verb_{name}"] = gather_full_state_dict(load_model(r / f"ck_{name}")[0])
        out[f"mem_{name}"] = nm.merge([sds[base], *(sds[o] for o in others)], config=cfg,
                                      **kwargs)
    out["models_slerp"] = nm.merge([models["a"], models["b"]], t=0.3)  # config: the models'
    out["untouched"] = all(torch.equal(v, gather_full_state_dict(models[x])[k])
                           for x in "abp" for k, v in sds[x].items())
    torch.save(out, r / "merged.pt")


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("memory")
    spawn(memory_job, 1, str(root))
    return torch.load(root / "merged.pt")


@pytest.mark.parametrize("name", list(CASES))
def test_in_memory_merge_equals_the_verb_bit_for_bit(merged, name):
    verb, mem = merged[f"verb_{name}"], merged[f"mem_{name}"]
    assert sorted(mem) == sorted(verb)
    for k in verb:
        assert torch.equal(mem[k], verb[k]), (name, k)
    a = merged["inputs"]["a"]
    assert any(not torch.equal(mem[k], a[k]) for k in a)  # it did merge


def test_models_merge_like_their_state_dicts(merged):
    assert merged["untouched"]  # neither the state dicts nor the models changed
    ref = merged["mem_slerp"]
    got = merged["models_slerp"]
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def _slerp64(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SLERP written from its formula in float64: the angle between the normalized tensors,
    applied to the tensors themselves."""
    a, b = a.double(), b.double()
    cos = torch.dot(a.flatten() / a.norm(), b.flatten() / b.norm()).clamp(-1, 1)
    theta = math.acos(float(cos))
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s * a + math.sin(t * theta) / s * b


def test_slerp_equals_the_formula_on_single_tensors(merged):
    a, b = merged["inputs"]["a"], merged["inputs"]["b"]
    mem = merged["mem_slerp"]
    key = "embedding.word_embeddings.weight"
    torch.testing.assert_close(mem[key].double(), _slerp64(0.3, a[key], b[key]),
                               rtol=0, atol=1e-6)
    # SwiGLU fc1 holds [gate; up]: each half is its own tensor with its own angle.
    key = "decoder.layers.1.mlp.linear_fc1.weight"
    f = a[key].shape[0] // 2
    for half in (slice(0, f), slice(f, 2 * f)):
        torch.testing.assert_close(mem[key][half].double(),
                                   _slerp64(0.3, a[key][half], b[key][half]), rtol=0, atol=1e-6)
    whole = _slerp64(0.3, a[key], b[key])  # one angle for the fused tensor: not what we do
    assert (mem[key].double() - whole).abs().max() > 1e-6

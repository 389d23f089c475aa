"""Planted MoE pruning through the command line, as a user runs it: a tiny Hugging Face Mixtral
and a Qwen2-MoE built with transformers itself (6 experts, top-2), whose planted experts are
inert and whose planted expert (and shared-expert) channels are zero, go through ``import-hf``
-> ``prune`` (``target.num_moe_experts``, ``target.moe_ffn_hidden_size``, Qwen2-MoE also
``target.moe_shared_expert_intermediate_size``; Mixtral at TP=1 and EP=2, Qwen2-MoE at TP=2) ->
``export-hf``, and transformers gives the pruned export the unpruned model's logits (1e-5).
Mixtral's zero channels differ from expert to expert and are pruned with
``target.moe_ffn_selection=per_expert`` (a shared index set cannot remove them all); Qwen2-MoE's
are the same in every expert and pruned with the default, one index set per layer.

Inert experts: every layer's router rows are ``v, 0, -v, u, 0, -u``. Of ``v.h`` and ``-v.h``
one is positive on every token, as is one of ``u.h`` and ``-u.h``, so the two zero rows (experts
1 and 4, logit 0) never make the top-2: zero load, zero routing weight. Removing them leaves
every token's routing as it was for a router that normalises over its top-k (Mixtral; Qwen2-MoE
is built with ``norm_topk_prob=True``: without it the softmax runs over every expert and the
zero rows' probabilities would count)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.cli import run_cli
from tests.dist import spawn
from tests.interop.hfmodels import WORDS, hf_logits, save_hf_model, save_tokenizer, tokens

INERT = [1, 4]
DEAD = [5, 17, 30, 41]  # expert channels, zero in every expert of every layer (Qwen2-MoE)


def dead(model: str, e: int) -> list[int]:
    """Expert ``e``'s zero channels: ``DEAD``, shifted by expert in Mixtral (per expert)."""
    return [(c + 7 * e) % MODELS[model][4] for c in DEAD] if model == "mixtral" else DEAD


SHARED_DEAD = [3, 20, 50, 77]  # shared-expert channels (Qwen2-MoE)
MODELS = {"mixtral": ("mixtral", {"num_local_experts": 6}, "block_sparse_moe.",
                      ("w1", "w3", "w2"), 128),
          "qwen2_moe": ("qwen2_moe", {"num_experts": 6, "norm_topk_prob": True}, "mlp.",
                        ("gate_proj", "up_proj", "down_proj"), 48)}
CALIB = ["calib.seq_length=16", "calib.num_samples=8", "calib.eval_samples=8",
         "calib.micro_batch_size=4", "target.hardware_multiple=1", "target.num_moe_experts=4"]


def _plant(directory: Path, model: str) -> None:
    """Zero router rows of ``INERT``, zero ``dead`` channels (fc1 rows and fc2 columns) of
    every expert and ``SHARED_DEAD`` of the shared expert, in the saved safetensors."""
    from safetensors.torch import load_file, save_file

    _, _, moe, names, _ = MODELS[model]
    shared = model == "qwen2_moe"
    path = directory / "model.safetensors"
    sd = load_file(path)
    g = torch.Generator().manual_seed(7)
    for i in range(2):
        p = f"model.layers.{i}.{moe}"
        v, u = torch.randn(2, 64, generator=g)
        sd[p + "gate.weight"] = torch.stack([v, torch.zeros(64), -v, u, torch.zeros(64), -u])
        units = [(f"{p}experts.{e}.", names, dead(model, e)) for e in range(6)]
        if shared:
            units.append((f"{p}shared_expert.", ("gate_proj", "up_proj", "down_proj"),
                          SHARED_DEAD))
        for q, (gate, up, down), zero in units:
            sd[f"{q}{gate}.weight"][zero] = 0
            sd[f"{q}{up}.weight"][zero] = 0
            sd[f"{q}{down}.weight"][:, zero] = 0
    save_file(sd, path, metadata={"format": "pt"})


def cli_job(args: list[str]) -> None:
    from nemo_minitron.cli import main

    assert main(args) == 0


def _ok(*args: str) -> None:
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from nemo_minitron.data.indexed import write_indexed_dataset
    from nemo_minitron.data.tokenizer import load_tokenizer

    r = tmp_path_factory.mktemp("moe_planted")
    save_tokenizer(r / "tok")
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(f"w{int(i)}" for i in torch.randint(0, WORDS - 3, (40,), generator=g))
            for _ in range(40)]
    write_indexed_dataset(docs, load_tokenizer(r / "tok"), r / "corpus", progress=False)
    data = [f"data.path={r / 'corpus'}", f"data.tokenizer={r / 'tok'}"]
    for name, (arch, kw, _, _, f) in MODELS.items():
        save_hf_model(r / f"hf_{name}", arch, tokenizer=False, **kw)
        _plant(r / f"hf_{name}", name)
        _ok("import-hf", str(r / f"hf_{name}"), str(r / f"ck_{name}"))
        target = [f"target.moe_ffn_hidden_size={f - len(DEAD)}", *CALIB, *data]
        if name == "mixtral":
            target.append("target.moe_ffn_selection=per_expert")
        if arch == "qwen2_moe":
            target.append("target.moe_shared_expert_intermediate_size=76")
            spawn(cli_job, 2, ["prune", str(r / f"ck_{name}"), str(r / f"pruned_{name}_tp2"),
                               *target, "parallel.tensor_model_parallel_size=2"])
            _ok("export-hf", str(r / f"pruned_{name}_tp2"), str(r / f"out_{name}_tp2"))
            continue  # Qwen2-MoE at TP=2 only: TP=1 is Mixtral's (CI time)
        _ok("prune", str(r / f"ck_{name}"), str(r / f"pruned_{name}"), *target)
        _ok("export-hf", str(r / f"pruned_{name}"), str(r / f"out_{name}"))
        # Mixtral also at EP=2: each rank scores and prunes its three experts.
        spawn(cli_job, 2, ["prune", str(r / f"ck_{name}"), str(r / f"pruned_{name}_ep2"),
                           *target, "parallel.expert_model_parallel_size=2"])
        _ok("export-hf", str(r / f"pruned_{name}_ep2"), str(r / f"out_{name}_ep2"))
    return r


@pytest.mark.dist
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe_tp2", "mixtral_ep2"])
def test_planted_moe_units_are_found_and_removed_exactly(runs, name):
    from nemo_minitron.importance.scores import Scores

    model = name.removesuffix("_tp2").removesuffix("_ep2")
    f = MODELS[model][4]
    cfg = json.loads((runs / f"out_{name}" / "config.json").read_text())
    experts = cfg.get("num_local_experts", cfg.get("num_experts"))
    width = cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    assert (experts, width) == (4, f - len(DEAD))
    if model == "qwen2_moe":
        assert cfg["shared_expert_intermediate_size"] == 76
    s = Scores.load(runs / f"pruned_{name}" / "pruning" / "scores.pt")
    assert (s.expert_load[:, INERT] == 0).all() and (s.expert_mass[:, INERT] == 0).all()
    assert (s.experts[:, INERT] == 0).all() and (s.expert_load.sum(1) == 2).all()
    for e in set(range(6)) - set(INERT):  # an inert expert sees no token: all its scores 0
        live = [c for c in range(f) if c not in dead(model, e)]
        assert (s.expert_channels[:, e, dead(model, e)] == 0).all()
        assert (s.expert_channels[:, e, live] > 0).all()
    if model == "qwen2_moe":  # the layer's one index set
        live = [c for c in range(f) if c not in DEAD]
        assert (s.expert_ffn[:, DEAD] == 0).all() and (s.expert_ffn[:, live] > 0).all()
    if model == "qwen2_moe":
        live = [c for c in range(80) if c not in SHARED_DEAD]
        assert (s.shared_expert_ffn[:, SHARED_DEAD] == 0).all()
        assert (s.shared_expert_ffn[:, live] > 0).all()
    report = (runs / f"pruned_{name}" / "pruning" / "report.md").read_text()
    assert "Experts per layer" in report and (runs / f"pruned_{name}" / "pruning" /
                                              "experts.png").stat().st_size > 0
    want = hf_logits(runs / f"hf_{model}", tokens())
    torch.testing.assert_close(hf_logits(runs / f"out_{name}", tokens()), want, atol=1e-5,
                               rtol=0)

"""The prune verb end to end on a tiny pretrained checkpoint: outputs, reshardable pruned
checkpoint, re-pruning from saved scores, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.dist import spawn
from tests.test_cli import _one_line_error, run_cli, run_torchrun
from tests.train.test_loop import pretrain_job


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_overrides) -> str:
    out = tmp_path_factory.mktemp("teacher") / "run"
    spawn(pretrain_job, 1, str(out), tiny_overrides + ["train.train_iters=20",
                                                       "train.eval_interval=0",
                                                       "train.lr=3e-3"])
    return str(out / "checkpoints" / "step_0000020")


def _data_overrides(tiny_overrides: list[str]) -> list[str]:
    return [o for o in tiny_overrides if o.startswith("data.")]


def logits_of(ckpt: str, out: str, tp: int) -> None:
    from nemo_minitron.checkpoint.io import load_model_config, load_weights
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.model.params import count_params
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp))
    cfg = load_model_config(ckpt)
    model = build_model(cfg)
    load_weights(ckpt, model)
    if tp == 1:
        assert sum(p.numel() for p in model.parameters()) == count_params(cfg)
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = forward_logits(model, tokens)
    if torch.distributed.get_rank() == 0:
        torch.save(logits, out)


@pytest.mark.dist
def test_prune_verb_end_to_end(tmp_path, teacher, tiny_overrides):
    out = tmp_path / "pruned"
    args = ["target.hidden_size=48", "target.ffn_hidden_size=64", "target.num_layers=1",
            "target.hardware_multiple=16", "calib.num_samples=16", "calib.micro_batch_size=4",
            "calib.eval_samples=8"]
    res = run_cli("prune", teacher, str(out), *args, *_data_overrides(tiny_overrides))
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load((out / "model_config.yaml").read_text())
    assert (cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["num_layers"]) == (48, 64, 1)
    assert cfg["kv_channels"] == 16 and cfg["num_query_groups"] == 2
    for name in ("scores.pt", "report.md", "layer_importance.png", "score_distributions.png"):
        assert (out / "pruning" / name).stat().st_size > 0
    summary = json.loads((out / "pruning" / "summary.json").read_text())
    assert summary["pruned_params"] < summary["source_params"]
    # What later stages need travels in the checkpoint's own metadata.
    from nemo_minitron.checkpoint.io import load_model_config
    from nemo_minitron.prune.origin import prune_origin

    origin = prune_origin(out)
    assert origin is not None and origin.kept_layers == summary["kept_layers"]
    assert origin.source == load_model_config(teacher) and origin.importance == "activation"
    assert prune_origin(teacher) is None
    # The pruned checkpoint is an ordinary checkpoint: TP=2 loads it with the TP=1 logits.
    spawn(logits_of, 1, str(out), str(tmp_path / "tp1.pt"), 1)
    spawn(logits_of, 2, str(out), str(tmp_path / "tp2.pt"), 2)
    torch.testing.assert_close(torch.load(tmp_path / "tp2.pt"), torch.load(tmp_path / "tp1.pt"),
                               atol=1e-5, rtol=0)
    # Re-pruning to another target reuses the saved scores (TP=1) under TP=2.
    again = tmp_path / "again"
    res = run_torchrun(2, "prune", teacher, str(again), "target.ffn_hidden_size=96",
                       "parallel.tensor_model_parallel_size=2",
                       f"scores={out / 'pruning' / 'scores.pt'}", "calib.num_samples=16",
                       "calib.micro_batch_size=4", "calib.eval_samples=8",
                       *_data_overrides(tiny_overrides))
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load((again / "model_config.yaml").read_text())["ffn_hidden_size"] == 96
    # Scores of the same shape but other weights are refused.
    data = torch.load(out / "pruning" / "scores.pt", weights_only=True)
    data["meta"]["fingerprint"] = [x * 1.001 for x in data["meta"]["fingerprint"]]
    torch.save(data, tmp_path / "other.pt")
    res = run_cli("prune", teacher, str(tmp_path / "refused"), "target.ffn_hidden_size=96",
                  f"scores={tmp_path / 'other.pt'}", "calib.micro_batch_size=4",
                  "calib.num_samples=16", "calib.eval_samples=8", *_data_overrides(tiny_overrides))
    _one_line_error(res, "scores were computed on different weights")
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("args, needles", [
    (["target.hidden_size=128"], ["target.hidden_size=128 is larger than the source's 64"]),
    (["target.num_attention_heads=3"],
     ["target.num_attention_heads=3 is not divisible by target.num_query_groups=2"]),
    (["calib.num_samples=6", "calib.micro_batch_size=4"],
     ["calib.num_samples=6 must be a positive multiple of calib.micro_batch_size=4"]),
    (["target.ffn_hidden_size=64", "scores=/nonexistent/scores.pt"],
     ["scores='/nonexistent/scores.pt' does not exist"]),
])
def test_bad_prune_input(tmp_path, teacher, tiny_overrides, args, needles):
    out = tmp_path / "pruned"
    res = run_cli("prune", teacher, str(out), *args, *_data_overrides(tiny_overrides))
    _one_line_error(res, *needles)
    assert not out.exists()


def test_depth_by_lm_loss_drops_the_cheapest_block(tmp_path, teacher, tiny_overrides):
    out = tmp_path / "depth"
    res = run_cli("prune", teacher, str(out), "target.num_layers=1",
                  "target.layer_metric=lm_loss", "calib.num_samples=8",
                  "calib.micro_batch_size=4", "calib.eval_samples=8",
                  *_data_overrides(tiny_overrides))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "pruning" / "summary.json").read_text())
    increase = summary["block_loss_increase"]
    assert len(increase) == 2  # two layers, a block of one
    dropped = min(range(2), key=lambda i: increase[i])
    assert summary["kept_layers"] == [1 - dropped]

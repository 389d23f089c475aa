"""The prune verb end to end on the session's tiny teacher (4 layers): outputs, reshardable pruned
checkpoint, re-pruning from saved scores, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.cli import _one_line_error, cli, run_cli, run_torchrun
from tests.dist import in_order, spawn


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
    assert summary["layers_removed_by"] == "block_importance"  # what the layer plot shows
    # What later stages need travels in the checkpoint's own metadata.
    from nemo_minitron.checkpoint.io import load_model_config
    from nemo_minitron.prune.origin import prune_origin

    origin = prune_origin(out)
    assert origin is not None and origin.kept_layers == summary["kept_layers"]
    assert origin.source == load_model_config(teacher) and origin.importance == "activation"
    assert prune_origin(teacher) is None
    # The pruned checkpoint is an ordinary checkpoint: TP=2 loads it with the TP=1 logits.
    spawn(in_order, 2, [(logits_of, (str(out), str(tmp_path / f"tp{tp}.pt"), tp))
                        for tp in (1, 2)])
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
    (["target.ffn_hidden_size=64", "calib.seq_length=0"],
     ["calib.seq_length=0 must be a positive integer"]),
])
def test_bad_prune_input(tmp_path, teacher, tiny_overrides, args, needles):
    # Refused before the runtime starts: in this process.
    out = tmp_path / "pruned"
    res = cli("prune", teacher, str(out), *args, *_data_overrides(tiny_overrides))
    _one_line_error(res, *needles)
    assert not out.exists()


def test_missing_scores_file(tmp_path, teacher, tiny_overrides):
    # Found after the runtime has started: in a child process.
    out = tmp_path / "pruned"
    res = run_cli("prune", teacher, str(out), "target.ffn_hidden_size=64",
                  "scores=/nonexistent/scores.pt", *_data_overrides(tiny_overrides))
    _one_line_error(res, "scores='/nonexistent/scores.pt' does not exist")
    assert not out.exists()


def test_depth_by_lm_loss_drops_the_cheapest_block(tmp_path, teacher, tiny_overrides):
    out = tmp_path / "depth"
    res = run_cli("prune", teacher, str(out), "target.num_layers=3",
                  "target.layer_metric=lm_loss", "calib.num_samples=8",
                  "calib.micro_batch_size=4", "calib.eval_samples=8", "calib.seq_length=32",
                  *_data_overrides(tiny_overrides))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "pruning" / "summary.json").read_text())
    # Calibration windows of their own length; the model keeps its training seq_length.
    assert summary["calib_seq_length"] == 32
    assert yaml.safe_load((out / "model_config.yaml").read_text())["seq_length"] == 64
    increase = summary["block_loss_increase"]
    assert len(increase) == 4  # four layers, a block of one
    dropped = min(range(4), key=lambda i: increase[i])
    assert summary["kept_layers"] == [i for i in range(4) if i != dropped]
    assert summary["layers_removed_by"] == "lm_loss"


def test_depth_by_angular_distance_drops_the_closest_block(tmp_path, teacher, tiny_overrides):
    out = tmp_path / "angular"
    res = run_cli("prune", teacher, str(out), "target.num_layers=3",
                  "target.layer_metric=angular_distance", "calib.num_samples=8",
                  "calib.micro_batch_size=4", "calib.eval_samples=8",
                  *_data_overrides(tiny_overrides))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "pruning" / "summary.json").read_text())
    scores = torch.load(out / "pruning" / "scores.pt", weights_only=True)
    d = scores["angular_distance"]  # boundaries 0..4 of the 4-layer teacher
    blocks = [float(d[i, i + 1]) for i in range(4)]
    assert summary["block_angular_distance"] == pytest.approx(blocks)
    dropped = min(range(4), key=lambda i: blocks[i])
    assert summary["kept_layers"] == [i for i in range(4) if i != dropped]
    assert summary["layers_removed_by"] == "angular_distance"
    assert "angular distance" in (out / "pruning" / "report.md").read_text()
    res = cli("prune", teacher, str(tmp_path / "refused"), "target.num_layers=3",
              "target.layer_metric=angular_distance", "importance=magnitude",
              *_data_overrides(tiny_overrides))
    _one_line_error(res, "target.layer_metric=angular_distance needs importance=activation")

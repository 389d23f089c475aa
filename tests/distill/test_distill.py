"""Distillation on the real Megatron schedule: PP=2 and TP=2 reproduce one process' losses
(logit KL + intermediate losses through learned projections on both pipeline stages), an
interrupted run resumes step for step, the default layer map, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nemo_minitron.distill.stage import layer_pairs
from tests.cli import _one_line_error, cli, run_module
from tests.dist import in_order, spawn
from tests.helpers.distill import _kd_overrides, _metrics, distill_job, summary_job
from tests.helpers.train import _copy_metrics


def api_job(out: str, teacher: str, student: str, overrides: list[str]) -> None:
    """A user's script: its own models in memory, then the Python API."""
    from nemo_minitron.checkpoint.io import (
        load_checkpoint_tokenizer,
        load_model_config,
        load_weights,
    )
    from nemo_minitron.config import ParallelConfig, load_recipe
    from nemo_minitron.distill.stage import DistillRecipe, distill_models
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig())
    t_model, s_model = build_model(load_model_config(teacher)), build_model(
        load_model_config(student))
    load_weights(teacher, t_model)
    load_weights(student, s_model)
    distill_models(load_recipe(None, overrides, cls=DistillRecipe), t_model, s_model,
                   load_model_config(student), load_checkpoint_tokenizer(student), out,
                   pairs=[(0, 1), (1, 3)])


def weight_shapes_job(ckpt: str, out: str) -> None:
    """``{name: shape}`` of every tensor in a checkpoint's weights, read from its metadata."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(Path(ckpt) / "weights"))
    Path(out).write_text(json.dumps({k: list(v.local_shape) for k, v in meta.items()}))



NAMES = ["loss", "kd loss", "lm loss", "hidden loss", "embedding loss"]
LAYOUTS = {"pp2": ["parallel.pipeline_model_parallel_size=2"],
           "tp2": ["parallel.tensor_model_parallel_size=2"]}


@pytest.mark.dist
def test_pp2_tp2_and_resume_reproduce_one_process(tmp_path, pair, tiny_overrides):
    teacher, student = pair
    kd = _kd_overrides(tiny_overrides, 3)
    # Two start-ups: every one-process run, then both 2-process layouts.
    cut = (distill_job, (str(tmp_path / "cut"), teacher, student, kd + ["train.exit_interval=1"]))
    spawn(in_order, 1, [
        (distill_job, (str(tmp_path / "ref"), teacher, student, kd)), cut,
        (_copy_metrics, (str(tmp_path / "cut"), str(tmp_path / "first.jsonl"))),
        (distill_job, (str(tmp_path / "cut"), teacher, student, kd)),
        (api_job, (str(tmp_path / "api"), teacher, student, kd)),
        (weight_shapes_job, (str(tmp_path / "ref" / "checkpoints" / "step_0000003"),
                             str(tmp_path / "weights.json")))])
    spawn(in_order, 2, [(distill_job, (str(tmp_path / name), teacher, student, kd + layout))
                        for name, layout in LAYOUTS.items()])
    ref = _metrics(tmp_path / "ref")
    assert sorted(ref) == [1, 2, 3]
    assert all(ref[1][n] > 0 for n in NAMES)
    assert ref[3]["kd loss"] < ref[1]["kd loss"]
    for name in LAYOUTS:
        got = _metrics(tmp_path / name)
        for step in ref:
            for n in NAMES:
                assert got[step][n] == pytest.approx(ref[step][n], abs=1e-5), (name, step, n)
    # Interrupted after step 1, resumed: the same losses step for step.
    assert sorted(_metrics(tmp_path, "first.jsonl")) == [1]
    got = _metrics(tmp_path / "cut")
    for step in ref:
        for n in NAMES:
            assert got[step][n] == ref[step][n], (step, n)
    # The Python API on in-memory models (same layer pairs as the default map) agrees.
    got = _metrics(tmp_path / "api")
    for step in ref:
        for n in NAMES:
            assert got[step][n] == pytest.approx(ref[step][n], abs=1e-6), (step, n)
    # The checkpoint holds the student and its projections, not the teacher: a 2-layer hidden-32
    # model, one Linear(32 -> 64) per mapped student layer and for the embedding, no more.
    ckpt = tmp_path / "ref" / "checkpoints" / "step_0000003"
    assert yaml.safe_load((ckpt / "model_config.yaml").read_text())["hidden_size"] == 32
    shapes = json.loads((tmp_path / "weights.json").read_text())
    proj = {k: v for k, v in shapes.items() if "kd_projections" in k}
    assert sorted(proj) == [f"kd_projections.{k}.weight" for k in ("embedding", "layer0",
                                                                   "layer1")], sorted(shapes)
    assert all(v == [64, 32] for v in proj.values()), proj
    assert shapes["embedding.word_embeddings.weight"] == [1024, 32]
    # Megatron stacks the layers' tensors: a leading axis of the student's 2 layers (not 4).
    stacked = {k: v for k, v in shapes.items() if k.startswith("decoder.layers.")}
    assert stacked and {v[0] for v in stacked.values()} == {2}, stacked
    for k, v in shapes.items():
        dims = v[1:] if k in stacked else v
        if k not in proj and len(dims) == 2:
            assert 32 in dims, (k, v)  # every matrix has the student's width on one side


def test_teacher_loss_is_the_loops_validation_and_own_seq_length(tmp_path, pair,
                                                                  tiny_overrides):
    """Distilling the teacher into itself on 32-token windows (its seq_length is 64): the
    reported teacher loss is the loop's own step-0 validation LM loss of that same model."""
    teacher, _ = pair
    kd = _kd_overrides(tiny_overrides, 1) + ["train.eval_interval=1", "train.eval_iters=2",
                                             "train.seq_length=32"]
    spawn(summary_job, 1, str(tmp_path / "self"), teacher, teacher, kd)
    rows = [json.loads(x) for x in (tmp_path / "self" / "metrics.jsonl").read_text().splitlines()]
    step0 = next(r for r in rows if r["kind"] == "valid" and r["step"] == 0)
    got = json.loads((tmp_path / "self" / "summary.json").read_text())["teacher"]
    assert got == pytest.approx(step0["lm loss"], abs=1e-5)
    cfg = yaml.safe_load((tmp_path / "self" / "checkpoints" / "step_0000001" /
                          "model_config.yaml").read_text())
    assert (cfg["seq_length"], cfg["max_position_embeddings"]) == (32, 64)


def test_default_layer_map(tmp_path):
    s, t = 4, 8
    assert layer_pairs(str(tmp_path), s, t, None) == [(0, 1), (1, 3), (2, 5), (3, 7)]
    (tmp_path / "pruning").mkdir()
    (tmp_path / "pruning" / "summary.json").write_text(json.dumps({"kept_layers": [0, 1, 2, 7]}))
    assert layer_pairs(str(tmp_path), s, t, None) == [(0, 0), (1, 1), (2, 2), (3, 7)]
    assert layer_pairs(str(tmp_path), s, t, [[3, 6]]) == [(3, 6)]


@pytest.mark.parametrize("extra, needles", [
    (["kd.layer_map=[[0,9]]"], ["kd.layer_map[0] names teacher layer 9", "0..3"]),
    (["kd.top_k=5", "kd.divergence=js"], ["kd.top_k=5", "kd.divergence=forward"]),
])
def test_bad_distill_input(tmp_path, pair, tiny_overrides, extra, needles):
    # Refused before the runtime starts: in this process.
    teacher, student = pair
    out = tmp_path / "out"
    res = cli("distill", "--teacher", teacher, "--student", student, "--out", str(out),
              *_kd_overrides(tiny_overrides, 2), *extra)
    _one_line_error(res, *needles)
    assert not out.exists()


def test_untrained_teacher_refused(tmp_path, pair, tiny_overrides):
    # Found by the teacher's first validation loss, after the runtime started: a child process.
    teacher, student = pair
    out = tmp_path / "out"
    res = run_module("distill", "--teacher", teacher, "--student", student, "--out", str(out),
                     *_kd_overrides(tiny_overrides, 2), "kd.teacher_max_loss_ratio=0.01")
    _one_line_error(res, "the teacher looks untrained")
    assert not out.exists()


def test_different_tokenizers_refused(tmp_path, pair, tiny_overrides):
    import shutil

    from nemo_minitron.checkpoint.manifest import write_manifest
    from nemo_minitron.data.tokenizer import load_tokenizer, train_sentencepiece

    teacher, student = pair
    train_sentencepiece(iter([Path(json.__file__).read_text()] * 3), 600,
                        tmp_path / "other.model")
    other = tmp_path / "other_student"
    shutil.copytree(student, other)
    shutil.rmtree(other / "tokenizer")
    load_tokenizer(str(tmp_path / "other.model")).save(other / "tokenizer")
    write_manifest(other)  # a consistent checkpoint with another tokenizer, not a corrupt one
    res = cli("distill", "--teacher", teacher, "--student", str(other),
              "--out", str(tmp_path / "o"), *_kd_overrides(tiny_overrides, 2))
    _one_line_error(res, "use different tokenizers")
    assert not (tmp_path / "o").exists()

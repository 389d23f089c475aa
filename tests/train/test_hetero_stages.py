"""A tiny heterogeneous model (a linear attention and a no-op MLP first, then a layer with its
own width and fewer query groups, then a no-op attention and a linear MLP) through the stages
on CPU: pretraining resumes bit for bit, and eval, distill, specdec, generate and bench run on
its checkpoint (bench with its per-layer table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli import run_cli
from tests.dist import in_order, spawn
from tests.helpers.train import pretrain_job

HETERO = ["model.num_layers=3",
          "model.layer_shapes=[{attention: linear, mlp: no_op}, "
          "{num_query_groups: 1, ffn_hidden_size: 64}, {attention: no_op, mlp: linear}]",
          "train.train_iters=3", "train.eval_interval=0", "train.lr=3e-3"]


def _train_rows(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lm loss"] for r in rows if r["kind"] == "train"}


@pytest.mark.dist
def test_hetero_pretrain_resumes_and_its_checkpoint_runs_the_stages(
        tiny_overrides, embedded_paths, tmp_path):
    full = (pretrain_job, (str(tmp_path / "full"), tiny_overrides + HETERO))
    cut = (pretrain_job, (str(tmp_path / "cut"), tiny_overrides + HETERO
                          + ["train.exit_interval=2"]))
    spawn(in_order, 1, [full, cut, cut])
    want, got = _train_rows(tmp_path / "full"), _train_rows(tmp_path / "cut")
    assert want.keys() == got.keys() == {1, 2, 3}
    assert got == want  # bit-exact on CPU
    ckpt = str(tmp_path / "full" / "checkpoints" / "step_0000003")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\nimport os\n")
    for args in (["eval", ckpt, "--data", embedded_paths[0], "--max-windows", "2"],
                 ["distill", "--teacher", ckpt, "--student", ckpt, *tiny_overrides,
                  "model.num_layers=3", "train.train_iters=1", "train.eval_interval=0",
                  "kd.teacher_max_loss_ratio=2", "--out", str(tmp_path / "kd")],
                 # Layers without attention have no core attention to check or cache.
                 ["specdec", "--target", ckpt, "--draft", ckpt, "--prompts", str(prompts),
                  "--draft-tokens", "2", "--max-new-tokens", "4", "--repeats", "1"],
                 ["generate", ckpt, "--prompt", "def f(", "--max-new-tokens", "4"],
                 ["bench", ckpt, "--batch-size", "1", "--seq-length", "8",
                  "--decode-tokens", "2", "--repeats", "1"]):
        r = run_cli(*args)
        assert r.returncode == 0, (args[0], r.stderr[-3000:])
        if args[0] == "bench":  # the per-layer table: kinds and sizes of each layer
            assert "| 1 | full 1 | full 64 |" in r.stdout and "| 2 | no_op | linear |" in r.stdout

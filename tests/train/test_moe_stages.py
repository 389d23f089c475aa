"""A tiny mixture-of-experts model (4 experts, top-2, a shared expert) through every stage on
CPU: pretraining logs the router's losses, under PP=2 too, and resumes bit for bit; under TP=2
(sequence parallelism, which megatron-core's MoE layer needs to train there) its losses equal
TP=1's; eval, generate, bench and distill run on its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli import run_cli
from tests.dist import in_order, spawn
from tests.helpers.train import pretrain_job

MOE = ["model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
       "model.moe_shared_expert_intermediate_size=64", "model.moe_aux_loss_coeff=0.01",
       "model.moe_z_loss_coeff=0.001", "train.train_iters=3", "train.eval_interval=0",
       "train.lr=3e-3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_overrides) -> Path:
    d = tmp_path_factory.mktemp("moe")
    spawn(pretrain_job, 1, str(d / "tp1"), tiny_overrides + MOE)
    spawn(pretrain_job, 2, str(d / "pp2"),
          tiny_overrides + MOE + ["parallel.pipeline_model_parallel_size=2"])
    spawn(in_order, 2, [
        (pretrain_job, (str(d / "tp2"), tiny_overrides + MOE + [
            "parallel.tensor_model_parallel_size=2"])),
        (refused_job, (str(d / "odd"), str(d / "odd.txt"), tiny_overrides + MOE + [
            "parallel.tensor_model_parallel_size=2", "train.seq_length=31"]))])
    return d


def refused_job(out: str, message: str, overrides: list[str]) -> None:
    import os

    from nemo_minitron.config import ConfigError

    try:
        pretrain_job(out, overrides)
    except ConfigError as e:
        if os.environ["RANK"] == "0":
            Path(message).write_text(str(e))


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["tp1", "pp2", "tp2"])
def test_moe_pretraining_logs_router_losses(runs, layout):
    rows = [json.loads(x) for x in (runs / layout / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3 and all(r["lm loss"] > 0 for r in train)
    for r in train:
        # E * sum_i f_i P_i is 1 for a balanced router and at most E (= 4) for a collapsed one.
        assert 0.9 < r["load_balancing_loss"] < 4.0
        assert r["z_loss"] > 0


def _train_rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == "train"}


@pytest.mark.dist
def test_moe_pretraining_resumes_step_for_step(runs, tiny_overrides, tmp_path):
    cut = (pretrain_job, (str(tmp_path / "cut"), tiny_overrides + MOE + ["train.exit_interval=2"]))
    spawn(in_order, 1, [cut, cut])
    full, resumed = _train_rows(runs / "tp1"), _train_rows(tmp_path / "cut")
    assert full.keys() == resumed.keys() == {1, 2, 3}
    for step in full:  # bit-exact on CPU, the router's losses included
        for name in ("lm loss", "load_balancing_loss", "z_loss"):
            assert resumed[step][name] == full[step][name], (step, name)


@pytest.mark.dist
def test_moe_training_under_tp_equals_tp1(runs):
    """Under TP=2 the model trains with sequence parallelism: each rank routes its half of the
    tokens, its norms' and router's gradients are summed over TP, and the router's losses are
    reduced over TP; every logged loss is TP=1's."""
    one, other = _train_rows(runs / "tp1"), _train_rows(runs / "tp2")
    assert one.keys() == other.keys() == {1, 2, 3}
    for step in one:
        for name in ("lm loss", "load_balancing_loss", "z_loss", "grad_norm"):
            assert other[step][name] == pytest.approx(one[step][name], rel=1e-5, abs=1e-6), \
                (step, name)


@pytest.mark.dist
def test_moe_sequence_length_tp_cannot_split_is_refused_in_one_line(runs):
    message = (runs / "odd.txt").read_text()
    assert "train.seq_length=31" in message and "\n" not in message
    assert not (runs / "odd").exists()


@pytest.mark.slow
@pytest.mark.dist
def test_moe_checkpoint_runs_eval_generate_bench_and_distill(runs, embedded_paths,
                                                             tiny_overrides, tmp_path):
    ckpt = str(runs / "tp1" / "checkpoints" / "step_0000003")
    prefix = embedded_paths[0]
    for args in (["eval", ckpt, "--data", prefix, "--max-windows", "2"],
                 ["generate", ckpt, "--prompt", "def f(", "--max-new-tokens", "4"],
                 ["bench", ckpt, ckpt, "--batch-size", "1", "--seq-length", "16"],
                 ["distill", "--teacher", ckpt, "--student", ckpt, *tiny_overrides,
                  "train.train_iters=1", "train.eval_interval=0",
                  "kd.teacher_max_loss_ratio=2", "--out",
                  str(tmp_path / "kd")]):
        r = run_cli(*args)
        assert r.returncode == 0, (args[0], r.stderr[-3000:])

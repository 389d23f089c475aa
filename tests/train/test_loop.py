"""The training loop on the real Megatron schedule/DDP/optimizer: layout equivalence of a
training step, learning on the embedded corpus, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist import in_order, spawn
from tests.helpers.train import (
    _copy_metrics,
    _train_losses,
    pretrain_job,
    state_dicts_job,
)


def _valid_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["lm loss"] for r in rows if r["kind"] == "valid"]


def finetune_job(ckpt: str, out: str, overrides: list[str]) -> None:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.train.pretrain import finetune

    finetune(load_recipe(None, overrides), ckpt, out)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, tiny_overrides) -> str:
    """A tiny model after 2 steps: the common starting point of the layout comparisons."""
    out = tmp_path_factory.mktemp("base") / "run"
    spawn(pretrain_job, 1, str(out), tiny_overrides + ["train.train_iters=2",
                                                       "train.eval_interval=0"])
    return str(out / "checkpoints" / "step_0000002")


LAYOUTS = {"pp2": ["parallel.pipeline_model_parallel_size=2"],
           "tp2": ["parallel.tensor_model_parallel_size=2"],
           "dp2": []}


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, base_checkpoint, tiny_overrides) -> Path:
    """Two steps from the base checkpoint in one process and under every 2-process layout (one
    start-up for all layouts), then every result's weights as a TP=1 state dict."""
    root = tmp_path_factory.mktemp("layouts")
    common = tiny_overrides + ["train.train_iters=2", "train.eval_interval=0",
                               "train.lr_warmup_iters=0"]
    spawn(in_order, 2, [(finetune_job, (base_checkpoint, str(root / name), common + par))
                        for name, par in LAYOUTS.items()])
    names = ["ref", *LAYOUTS]
    spawn(in_order, 1, [
        (finetune_job, (base_checkpoint, str(root / "ref"), common)),
        (state_dicts_job, ([base_checkpoint] + [str(root / n / "checkpoints" / "step_0000002")
                                                for n in names],
                           [str(root / f"{n}.pt") for n in ["base", *names]]))])
    return root


@pytest.mark.dist
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_train_step_matches_single_process(layout_runs, layout):
    """Two steps (so Adam's second moment and the LR schedule are exercised) under a 2-process
    layout reproduce one process: same losses, same updated weights (1e-5)."""
    ref, got = _train_losses(layout_runs / "ref"), _train_losses(layout_runs / layout)
    assert ref.keys() == got.keys() == {1, 2}
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5)
    a, b = torch.load(layout_runs / "ref.pt"), torch.load(layout_runs / f"{layout}.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    # Sanity: the steps changed the weights.
    base = torch.load(layout_runs / "base.pt")
    assert any((base[k] - a[k]).abs().max() > 1e-4 for k in a)


@pytest.mark.slow
def test_pretraining_lowers_validation_loss_by_30_percent(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    spawn(pretrain_job, 1, str(out), tiny_overrides + [
        "train.train_iters=150", "train.eval_interval=150", "train.lr=3e-3", "train.min_lr=3e-4",
        "train.lr_warmup_iters=10", "train.log_interval=50"])
    losses = _valid_losses(out)
    assert len(losses) == 2
    assert losses[-1] <= 0.7 * losses[0], losses
    assert (out / "loss.png").stat().st_size > 0


def test_interrupted_run_resumes_step_for_step(tmp_path, tiny_overrides):
    common = tiny_overrides + ["train.train_iters=6", "train.eval_interval=3",
                               "train.lr_warmup_iters=2"]
    cut = (pretrain_job, (str(tmp_path / "cut"), common + ["train.exit_interval=3"]))
    spawn(in_order, 1, [(pretrain_job, (str(tmp_path / "full"), common)), cut,
                        (_copy_metrics, (str(tmp_path / "cut"), str(tmp_path / "first.jsonl"))),
                        cut])
    assert _train_losses(tmp_path, "first.jsonl").keys() == {1, 2, 3}
    full, cut = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "cut")
    assert full.keys() == cut.keys() == set(range(1, 7))
    assert [cut[s] for s in range(1, 7)] == [full[s] for s in range(1, 7)]  # bit-exact on CPU
    assert _valid_losses(tmp_path / "cut") == _valid_losses(tmp_path / "full")


def test_pretrain_on_a_user_dataset_path(tmp_path, tiny_overrides, embedded_paths):
    """data.path + data.tokenizer (a user's indexed dataset) instead of the embedded default;
    the checkpoint carries the tokenizer and the padded vocabulary."""
    prefix, tok = embedded_paths
    spawn(pretrain_job, 1, str(tmp_path / "run"), tiny_overrides + [
        f"data.path={prefix}", f"data.tokenizer={tok}", "train.train_iters=2",
        "train.eval_interval=0"])
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    from nemo_minitron.checkpoint.io import load_checkpoint_tokenizer, load_model_config

    assert load_model_config(ckpt).vocab_size == 1024  # 1000 padded to a multiple of 128
    assert load_checkpoint_tokenizer(ckpt).vocab_size == 1000


def test_warmup_longer_than_the_run_and_iters_below_the_resume_step_warn_once(
        tmp_path, tiny_overrides):
    from tests.cli import run_cli

    out = tmp_path / "run"
    base = [*tiny_overrides, "train.eval_interval=0", "train.lr=1e-3", "--out", str(out)]
    res = run_cli("pretrain", *base, "train.train_iters=2", "train.lr_warmup_iters=8")
    assert res.returncode == 0, res.stderr[-2000:]
    warned = [x for x in res.stderr.splitlines() if "train.lr_warmup_iters=8" in x]
    assert len(warned) == 1, res.stderr
    # The peak it names is the scheduler's own learning rate at the last step.
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last_lr = [r["lr"] for r in rows if r["kind"] == "train"][-1]
    assert f"reaching {last_lr:.3g} " in warned[0], (last_lr, warned[0])
    before = (out / "metrics.jsonl").read_text()
    res = run_cli("pretrain", *base, "train.train_iters=1", "train.lr_warmup_iters=1")
    assert res.returncode == 0, res.stderr[-2000:]
    warned = [x for x in res.stderr.splitlines() if "train.train_iters=1 is below step 2" in x]
    assert len(warned) == 1, res.stderr
    assert "lr_warmup_iters" not in res.stderr
    assert (out / "metrics.jsonl").read_text() == before  # nothing was trained

"""``examples/``: each script runs at tiny scale as a user would run it (its own process), and
what it prints is checked against the command line on the same weights: the stock megatron-core
model's validation loss equals our model's on the same windows, the pruned model's equals that
of ``nemo-minitron prune`` given the example's scores, and the in-memory merge's equals that
of ``nemo-minitron merge``."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli import run_cli
from tests.dist import spawn
from tests.helpers.train import pretrain_job

ROOT = Path(__file__).resolve().parents[1]
SEQ, VALID, CALIB, MBS = 64, 16, 16, 4  # the examples' defaults


def _example(name: str, *args: str, nproc: int = 1) -> dict[str, str]:
    """Run ``examples/<name>`` (under ``torchrun --nproc-per-node nproc`` when ``nproc > 1``)
    and return its ``label: value`` lines."""
    launch = [sys.executable] if nproc == 1 else [
        str(Path(sys.executable).with_name("torchrun")), "--standalone",
        f"--nproc-per-node={nproc}"]
    run = subprocess.run([*launch, str(ROOT / "examples" / name), *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(line.split(": ", 1) for line in run.stdout.splitlines() if ": " in line)


def _windows(prefix: str, skip: int, n: int) -> torch.Tensor:
    """``n`` windows of ``SEQ + 1`` tokens after ``skip`` windows of the documents joined in
    order (the examples' data, read here with megatron-core's reader)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    need, parts = (skip + n) * (SEQ + 1), []
    while sum(len(p) for p in parts) < need:
        parts.append(torch.from_numpy(ds[len(parts)].astype("int64")))
    return torch.cat(parts)[:need].view(-1, SEQ + 1)[skip:]


def losses_job(out: str, tokens: torch.Tensor, checkpoints: list[str]) -> None:
    """Our model (``load_model``), our schedule's loss (``model.forward.lm_loss``)."""
    from nemo_minitron.checkpoint.io import load_model
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.forward import lm_loss

    losses = [lm_loss(load_model(c, ParallelConfig())[0], tokens, MBS) for c in checkpoints]
    torch.save(losses, out)


def _losses(tmp: Path, tokens: torch.Tensor, checkpoints: list[str]) -> list[float]:
    spawn(losses_job, 1, str(tmp / "losses.pt"), tokens, checkpoints)
    return torch.load(tmp / "losses.pt")


def _data(tiny_overrides: list[str]) -> list[str]:
    return [o for o in tiny_overrides if o.startswith("data.")]


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.dist)],
                         ids=["python", "torchrun-tp2"])
def test_prune_example_equals_the_prune_verb(tmp_path, teacher, embedded_paths,
                                             tiny_overrides, tp):
    prefix = embedded_paths[0]
    scores = tmp_path / "scores.pt"
    got = _example("prune_megatron_model.py", "--load", teacher, "--data", prefix,
                   "--target-num-layers", "3", "--scores-out", str(scores),
                   "--distill-steps", "8", "--save", str(tmp_path / "saved"),
                   "--tensor-model-parallel-size", str(tp), nproc=tp)
    assert got["pruned model"] == "megatron.core.models.gpt.gpt_model.GPTModel"
    target = ["target.num_layers=3", "target.hidden_size=48", "target.ffn_hidden_size=64",
              "target.hardware_multiple=16"]
    res = run_cli("prune", teacher, str(tmp_path / "pruned"), f"scores={scores}", *target,
                  "calib.num_samples=16", "calib.micro_batch_size=4", "calib.eval_samples=8",
                  *_data(tiny_overrides))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "pruned" / "pruning" / "summary.json").read_text())
    assert got["kept layers"] == str(summary["kept_layers"])
    if tp == 1:
        assert got["parameters on rank 0"] == (f"{summary['source_params']} -> "
                                               f"{summary['pruned_params']}")
    else:  # rank 0 holds its TP shard of each
        before, after = (int(x) for x in got["parameters on rank 0"].split(" -> "))
        assert before < summary["source_params"] and after < summary["pruned_params"]
    before, after = _losses(tmp_path, _windows(prefix, CALIB, VALID),
                            [teacher, str(tmp_path / "pruned")])
    assert float(got["validation loss before pruning"]) == pytest.approx(before, abs=2e-5)
    assert float(got["validation loss after pruning"]) == pytest.approx(after, abs=2e-5)
    assert after > before + 1e-3  # pruning did change the model
    # KD with nm.KDLoss in the example's own Megatron loop recovers part of the loss, and the
    # model saved with megatron-core's dist_checkpointing reads back to the same loss.
    first, last = (float(x) for x in got["kd loss"].split(" -> "))
    distilled = float(got["validation loss after distillation"])
    assert last < first and before < distilled < after - 1e-3
    assert float(got[f"validation loss reloaded from {tmp_path / 'saved'}"]) == distilled


def test_prune_example_trains_a_fresh_model():
    got = _example("prune_megatron_model.py", "--train-steps", "4")
    first, last = (float(x) for x in got["training loss"].split(" -> "))
    assert last < first
    assert math.isfinite(float(got["validation loss after pruning"]))
    assert got["parameters on rank 0"].startswith("279104 -> ")  # the teacher's shape


def test_merge_example_equals_the_merge_verb(tmp_path, teacher, embedded_paths,
                                             tiny_overrides):
    spawn(pretrain_job, 1, str(tmp_path / "other"), tiny_overrides + [
        "model.num_layers=4", "train.train_iters=2", "train.eval_interval=0", "train.seed=7"])
    other = str(tmp_path / "other" / "checkpoints" / "step_0000002")
    got = _example("merge_in_memory.py", "--load", teacher, "--load", other, "--data",
                   embedded_paths[0], "--t", "0.3")
    res = run_cli("merge", "--base", teacher, "--other", other, "merge.t=0.3", "--out",
                  str(tmp_path / "merged"))
    assert res.returncode == 0, res.stderr
    want = _losses(tmp_path, _windows(embedded_paths[0], 0, VALID),
                   [teacher, other, str(tmp_path / "merged")])
    for name, loss in zip(("first", "second", "merged"), want):
        assert float(got[f"validation loss of the {name} model"]) == pytest.approx(
            loss, abs=2e-5), name
    assert len({round(x, 3) for x in want}) == 3  # three different models


def test_library_doc_runs(tmp_path):
    """Every ``python`` block of docs/library.md, in order, as one script."""
    doc = (ROOT / "docs" / "library.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) >= 10
    script = tmp_path / "library_doc.py"
    script.write_text("\n".join(blocks) + "\nprint('doc ok')\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("doc ok"), run.stderr[-3000:]

"""Smoke test of ``bench-method`` at a tiny scale and one seed: every section runs through the
CLI and the report is well formed; the fixed validation set is the training loop's own
validation set."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.cli import run_cli
from tests.conftest import SMALL_DATA


def run(*args: str) -> subprocess.CompletedProcess:
    # ~60 library stages in one command: minutes, not the usual CLI-test timeout. One thread
    # unless OMP_NUM_THREADS is set (xdist sets each worker's share): the models are tiny, and
    # on a shared machine OpenMP's spinning threads made the run several times slower.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return run_cli(*args, env=env, timeout=1800)

_V = r"(?:agree|disagree|tie|inconclusive \(the seeds disagree\))"
# "**agree**", or per part: "**one-shot: agree; after retraining: disagree**"
VERDICT = re.compile(rf"\*\*(?:[\w -]+: )?{_V}(?:; [\w -]+: {_V})*\*\*")


def smoke_overrides(data_cache: str) -> list[str]:
    data = [f"teacher.data.cache_dir={data_cache}",
            f"teacher.data.tokenizer_vocab_size={SMALL_DATA['tokenizer_vocab_size']}",
            f"teacher.data.corpus_max_bytes={SMALL_DATA['corpus_max_bytes']}"]
    model = ["teacher.model.num_layers=4", "teacher.model.hidden_size=64",
             "teacher.model.ffn_hidden_size=128", "teacher.model.num_attention_heads=4",
             "teacher.model.num_query_groups=2", "teacher.model.seq_length=64"]
    teacher = ["teacher.train.train_iters=40", "teacher.train.lr_warmup_iters=5",
               "teacher.train.micro_batch_size=4", "teacher.train.eval_iters=2",
               "teacher.train.tensorboard=false", "teacher.train.save_interval=0"]
    # One seed: the verdicts over several seeds are unit-tested in test_verdict.py.
    return data + model + teacher + [
        "study.seeds=[0]", "study.width_hidden_size=48", "study.width_ffn_hidden_size_step=16",
        "study.eval_samples=16",
        "calib.num_samples=8", "calib.micro_batch_size=4", "calib.eval_samples=8",
        "retrain.train_iters=4", "retrain.eval_interval=2", "retrain.eval_iters=2",
        "retrain.micro_batch_size=4", "retrain.log_interval=2", "retrain.tensorboard=false",
        "kd.teacher_max_loss_ratio=0.99", "throughput.batch_size=2",
        "throughput.seq_length=16", "throughput.decode_tokens=4", "throughput.repeats=1",
        *instruct_overrides()]


def instruct_overrides() -> list[str]:
    """The sdd / merge / specdec chain at its smallest: 8 instructions, 2 SFT steps of one
    micro-batch, 4 held-out instructions (one validation micro-batch), 2 greedy answers."""
    loops = [f"{k}.{v}" for k in ("tune", "sft") for v in (
        "train_iters=2", "eval_interval=2", "eval_iters=1", "micro_batch_size=4",
        "global_batch_size=4", "lr_warmup_iters=1", "log_interval=2", "tensorboard=false")]
    return loops + [
        "instruct.max_chars=2000", "instruct.seq_length=384", "instruct.train_examples=8",
        "instruct.eval_examples=4", "instruct.gen_prompts=2", "instruct.max_new_tokens=16",
        "rewrite.sampling.max_new_tokens=16", "specdec.draft_tokens=[2]", "specdec.batch_size=2"]


@pytest.mark.slow
def test_bench_method_smoke(tmp_path, data_cache):
    out, report = tmp_path / "work", tmp_path / "report"
    args = ["bench-method", *smoke_overrides(data_cache), "--out", str(out), "--report",
            str(report)]
    res = run(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    text = (report / "report.md").read_text()
    summary = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in summary.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(rows) == 11, summary
    assert all(VERDICT.search(row) for row in rows), rows
    assert "bench-method" in text and "--report" in text  # the command that regenerates it
    for png in ("aggregation", "width_depth", "kd_vs_ce", "intermediate", "scratch", "teacher",
                "sdd"):
        assert f"]({png}.png)" in text
        assert (report / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    units = {p.stem: json.loads(p.read_text()) for p in (out / "units").glob("*.json")}
    # The fixed validation set is the training loop's own (first seed): the loop's last
    # validation and a fresh evaluation of the saved checkpoint agree.
    for name in ("kd-width-s0", "ce-width-s0", "scratch-width-s0"):
        assert units[name]["curve"][-1][1] == pytest.approx(units[name]["loss"], abs=1e-4)
    assert units["width-s0"]["params"] == pytest.approx(units["depth-s0"]["params"], rel=0.05)
    # The instruction chain: the held-out task loss is the SFT loop's own validation loss (one
    # micro-batch holding every held-out instruction); 4 -> 3 layers; the rewrite counts add
    # up; greedy speculative decoding reproduces the target's own output.
    for name in ("tuned-teacher", "sft-s0", "sdd-s0", "sdd-half-a-s0"):
        assert units[name]["curve"][-1][1] == pytest.approx(units[f"scores-{name}"]["task_loss"],
                                                            abs=1e-4)
    assert units["instruct-data"]["eval_examples"] == 4
    assert len(units["sdd-prune-s0"]["kept_layers"]) == 3
    rw = units["rewrite-s0"]
    assert rw["examples"] == 8 and rw["kept"] == 8 - sum(rw["rejected_by_reason"].values())
    for key in ("pruned", "sft", "sdd"):
        (row,) = units[f"specdec-{key}-s0"]["rows"]
        assert row["draft_tokens"] == 2 and row["greedy_identical"] is True

    # The same command again reuses every unit and writes the same findings.
    again = tmp_path / "again"
    res = run(*args[:-1], str(again))
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (out / "units").glob("*.json")) == sorted(
        f"{n}.json" for n in units)
    assert (again / "report.md").read_text().split("## Summary")[1] == text.split("## Summary")[1]

    # Same --out, other settings: refused before any work, nothing mixed.
    res = run(*args, "retrain.train_iters=6")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: --out ")
    assert "retrain.train_iters differs" in res.stderr


@pytest.mark.parametrize("override, message", [
    ("instruct.gen_prompts=41", "instruct.gen_prompts=41 must be <= instruct.eval_examples=40"),
    ("instruct.train_examples=-1", "instruct.train_examples=-1 must be >= 0"),
    ("sft.eval_interval=30", "sft.eval_interval=30 must be > 0 and divide sft.train_iters=100"),
    ("merge.method=task", "merge.method='task' needs a common base model"),
])
def test_instruct_recipe_checks(override, message):
    from benchmarks.method.config import load_bench_recipe
    from nemo_minitron.config import ConfigError

    assert load_bench_recipe(None, []).instruct.gen_prompts == 16  # the defaults load
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_bench_recipe(None, [override])

"""The method study's smoke settings and its verdict pattern."""

from __future__ import annotations

import os
import re
import subprocess

from tests.cli import run_cli
from tests.helpers.data import SMALL_DATA

_V = r"(?:agree|disagree|tie|inconclusive \(the seeds disagree\))"


# "**agree**", or per part: "**one-shot: agree; after retraining: disagree**"
VERDICT = re.compile(rf"\*\*(?:[\w -]+: )?{_V}(?:; [\w -]+: {_V})*\*\*")


def run_bench(*args: str) -> subprocess.CompletedProcess:
    """``nemo-minitron ARGS`` for a bench-method run: minutes of library stages, not the usual
    CLI-test timeout. One thread unless OMP_NUM_THREADS is set (xdist sets each worker's
    share): the models are tiny, and on a shared machine OpenMP's spinning threads made the run
    several times slower."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return run_cli(*args, env=env, timeout=1800)


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

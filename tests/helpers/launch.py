"""Launcher helpers the launch and fan-out tests share."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.cli import Result, cli, run_cli

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    """The verb in a child process (the jobs it submits run the program again)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if path is not None:
        env["PATH"] = path
    return run_cli(*args, env=env, timeout=600)


def _dry(*args: str, path: str | None = None) -> Result:
    """The verb in this process: dry runs and refusals start nothing."""
    return cli(*args, env=None if path is None else {"PATH": path})


def _words(script: str, array: str = "cmd") -> list[str]:
    """The words of the script's ``array=(...)`` as bash itself reads them."""
    line = next(x for x in script.splitlines() if x.startswith(f"{array}=("))
    done = subprocess.run(["bash", "-c", f'{line}\nprintf "%s\\0" "${{{array}[@]}}"'],
                          capture_output=True, text=True, check=True)
    return done.stdout.split("\0")[:-1]


def _fake_checkpoint(path: Path) -> None:
    (path / "weights").mkdir(parents=True)
    (path / "model_config.yaml").write_text("num_layers: 4\n")


def _args(tiny_overrides: list[str]) -> list[str]:
    data = [o for o in tiny_overrides if o.startswith("data.")]
    return data + [
        "search.target_params=205200", "search.tolerance=0.01", "search.retrain_steps=2",
        "search.hidden_size_step=64", "search.ffn_hidden_size_step=64", "calib.num_samples=8",
        "calib.eval_samples=8", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.eval_interval=1", "train.eval_iters=2", "train.lr=1e-3", "train.lr_warmup_iters=0",
        "train.tensorboard=false", "train.log_interval=1"]

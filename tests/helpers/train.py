"""Training runs the tests share: the pretraining job, checkpoints' state dicts, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _train_losses(run_dir: Path, name: str = "metrics.jsonl") -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / name).read_text().splitlines()]
    return {r["step"]: r["lm loss"] for r in rows if r["kind"] == "train"}


def _copy_metrics(run: str, to: str) -> None:
    """The metrics of a run so far (for a look at them before it is resumed)."""
    import shutil

    shutil.copyfile(Path(run) / "metrics.jsonl", to)


def pretrain_job(out: str, overrides: list[str]) -> None:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.train.pretrain import pretrain

    pretrain(load_recipe(None, overrides), out)


def state_dict_job(ckpt: str, out: str) -> None:
    from nemo_minitron.checkpoint.io import load_model_config, load_weights
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig())
    model = build_model(load_model_config(ckpt))
    load_weights(ckpt, model)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()
                if not k.endswith("_extra_state")}, out)


def state_dicts_job(ckpts: list[str], outs: list[str]) -> None:
    for ckpt, out in zip(ckpts, outs):
        state_dict_job(ckpt, out)

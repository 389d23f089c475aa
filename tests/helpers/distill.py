"""Distillation models and batches the tests share."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEACHER = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
               num_query_groups=2, seq_length=16, vocab_size=256)


STUDENT = dict(TEACHER, hidden_size=48, ffn_hidden_size=96, kv_channels=16)


def _batches(mbs: int, n_micro: int, s: int) -> list[dict[str, torch.Tensor]]:
    """``n_micro`` micro-batches of ``mbs`` random sequences of ``s`` tokens, with a random
    loss mask (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, TEACHER["vocab_size"], (mbs * n_micro, s + 1), generator=g)
    masks = (torch.rand(mbs * n_micro, s, generator=g) > 0.3).float()
    return [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": m,
             "position_ids": torch.arange(s).expand(mbs, s)}
            for t, m in zip(toks.split(mbs), masks.split(mbs))]


def _stock_student(cfg) -> torch.nn.Module:
    """``build_model(cfg)`` with Megatron's own ``GPTModel`` class."""
    from megatron.core.models.gpt import GPTModel

    from nemo_minitron.model import build, gpt

    ours = gpt.MinitronGPTModel
    gpt.MinitronGPTModel = GPTModel
    try:
        return build.build_model(cfg)
    finally:
        gpt.MinitronGPTModel = ours


def _full(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from this rank's vocabulary slice."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if ps.get_tensor_model_parallel_world_size() == 1:
        return logits
    return gather_from_tensor_model_parallel_region(logits)


def distill_job(out: str, teacher: str, student: str, overrides: list[str]) -> None:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.distill.stage import DistillRecipe, distill

    distill(load_recipe(None, overrides, cls=DistillRecipe), teacher, student, out)


def _kd_overrides(tiny_overrides: list[str], iters: int) -> list[str]:
    data = [o for o in tiny_overrides if o.startswith("data.")]
    return data + [
        f"train.train_iters={iters}", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.eval_interval=0", "train.log_interval=1", "train.tensorboard=false",
        "train.lr=1e-3", "train.lr_warmup_iters=0", "kd.hidden_weight=1.0",
        "kd.embedding_weight=0.5", "kd.temperature=2.0", "kd.chunk_tokens=50",
    ]


def summary_job(out: str, teacher: str, student: str, overrides: list[str]) -> None:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.distill.stage import DistillRecipe, distill

    summary = distill(load_recipe(None, overrides, cls=DistillRecipe), teacher, student, out)
    (Path(out) / "summary.json").write_text(json.dumps({"teacher": summary["teacher_valid_loss"]}))


def _metrics(run: Path, name: str = "metrics.jsonl") -> dict[int, dict[str, float]]:
    rows = [json.loads(x) for x in (run / name).read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == "train"}

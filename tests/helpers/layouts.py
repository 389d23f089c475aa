"""The layout-equivalence job shared by the model tests (dense, MoE): build a model of a given
config under TP/PP, optionally load a checkpoint saved under another layout, run a fixed batch,
optionally save, and write the logits from the last rank."""

from __future__ import annotations

import os
from typing import Any

import torch


def tokens(vocab: int, seq: int) -> torch.Tensor:
    """The fixed batch ``[4, seq]`` every layout runs."""
    return torch.randint(0, vocab, (4, seq), generator=torch.Generator().manual_seed(0))


def logits_job(out: str, cfg: dict[str, Any], tp: int, pp: int, ckpt_in: str | None,
               ckpt_out: str | None, ep: int = 1) -> None:
    """In a spawned process: the logits of ``ModelConfig(**cfg)`` under TP=``tp``, PP=``pp``,
    EP=``ep`` (seed 7; ``ckpt_in``'s weights when given) to ``out``; the model saved to
    ``ckpt_out``."""
    from nemo_minitron.checkpoint.io import load_weights, save_checkpoint
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                    expert_model_parallel_size=ep), seed=7)
    model_cfg = ModelConfig(**cfg)
    model = build_model(model_cfg)
    if ckpt_in:
        load_weights(ckpt_in, model)
    logits = forward_logits(model, tokens(model_cfg.vocab_size, model_cfg.seq_length),
                            micro_batch_size=2)
    if ckpt_out:
        save_checkpoint(ckpt_out, model, model_cfg=model_cfg, tokenizer=None)
    if logits is not None and int(os.environ["RANK"]) == torch.distributed.get_world_size() - 1:
        torch.save(logits, out)

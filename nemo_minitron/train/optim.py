"""Megatron's optimizer, DDP wrapper and LR scheduler, configured from ``TrainConfig``.

On GPU: Megatron's distributed optimizer over its DDP grad buffers (bf16 params, fp32 main
weights). On CPU (gloo has no reduce-scatter): the same DDP wrapper with an all-reduce and
Megatron's non-distributed optimizer; the CPU backend makes its CUDA type checks pass.
"""

from __future__ import annotations

import torch

from nemo_minitron.config import TrainConfig
from nemo_minitron.model.build import params_dtype
from nemo_minitron.utils.logging import get_logger, warn_once

log = get_logger("train")


def wrap_ddp(model: torch.nn.Module, *, distributed_optimizer: bool) -> torch.nn.Module:
    """Megatron ``DistributedDataParallel`` around one model chunk."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(model_chunks: list[torch.nn.Module], cfg: TrainConfig, *, bf16: bool,
                    distributed_optimizer: bool):
    """Megatron AdamW + warm-up/cosine ``OptimizerParamScheduler``."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        params_dtype=params_dtype(bf16),
        use_distributed_optimizer=distributed_optimizer,
    )
    if cfg.lr_warmup_iters > cfg.train_iters:
        warn_once(log, f"train.lr_warmup_iters={cfg.lr_warmup_iters} is longer than the run "
                  f"(train.train_iters={cfg.train_iters}): the learning rate only rises, "
                  f"reaching {cfg.lr * cfg.train_iters / cfg.lr_warmup_iters:.3g} (train.lr="
                  f"{cfg.lr:g}) at the last step, and never decays")
    optimizer = get_megatron_optimizer(opt_cfg, model_chunks)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters,
        lr_decay_steps=max(cfg.train_iters, cfg.lr_warmup_iters + 1),
        lr_decay_style="cosine",
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler

"""Prune a NeMo 2 checkpoint with nemo_minitron inside the NeMo container (not verified here: NeMo
is not installed in this project's environment; see docs/library.md, "NeMo 2").

NeMo 2 restores the model as ``llm.GPTModel``, a Lightning module whose ``.module`` is
megatron-core's ``GPTModel`` (under a ``Float16Module`` for bf16) built with NeMo's layer spec
(Transformer Engine by default). nemo_minitron works on that megatron-core model directly:
its importance estimator runs during NeMo's own ``llm.validate`` loop, ``nm.prune`` returns a
megatron-core ``GPTModel`` of the same class and spec, which replaces the old one in the
Lightning module before NeMo writes the checkpoint::

    torchrun --nproc-per-node 8 examples/nemo_prune.py --nemo-checkpoint /ckpt/llama31-8b \\
        --data /data/calib_text_document --tp 8 --save-path /ckpt/llama31-8b-pruned \\
        --target-hidden-size 3072 --target-ffn-hidden-size 9216

The result is a NeMo 2 checkpoint (``context/`` + ``weights/``) that NeMo's distillation recipe
(``llm.distill``) or Megatron-Bridge's ``AutoBridge`` loads as usual.
"""

from __future__ import annotations

import argparse

import torch
from megatron.core import dist_checkpointing
from nemo import lightning as nl
from nemo.collections import llm
from nemo.collections.llm.inference.base import _setup_trainer_and_restore_model
from nemo.lightning.ckpt_utils import ckpt_to_context_subdir
from nemo.lightning.io.pl import TrainerContext, ckpt_to_weights_subdir
from nemo.utils.get_rank import is_global_rank_zero
from nemo.utils.model_utils import unwrap_model

import nemo_minitron as nm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nemo-checkpoint", required=True)
    p.add_argument("--save-path", required=True)
    p.add_argument("--data", required=True, help="Megatron indexed dataset prefix")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--calib-samples", type=int, default=1024)
    p.add_argument("--target-num-layers", type=int)
    p.add_argument("--target-hidden-size", type=int)
    p.add_argument("--target-ffn-hidden-size", type=int)
    p.add_argument("--target-num-attention-heads", type=int)
    p.add_argument("--target-num-query-groups", type=int)
    a = p.parse_args()

    # NeMo's own restore, as llm.prune does it (inference only, no optimizer).
    strategy = nl.MegatronStrategy(
        tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
        pipeline_dtype=torch.bfloat16, ckpt_load_optimizer=False, setup_optimizers=False,
        ddp="pytorch", sequence_parallel=False)
    steps = a.calib_samples
    trainer = nl.Trainer(devices=a.devices, accelerator="gpu", strategy=strategy,
                         max_steps=steps, limit_val_batches=steps, val_check_interval=steps,
                         plugins=nl.MegatronMixedPrecision(precision="bf16-mixed",
                                                           params_dtype=torch.bfloat16))
    model = nl.io.load_context(path=ckpt_to_context_subdir(a.nemo_checkpoint), subpath="model")
    del model.optim
    _setup_trainer_and_restore_model(a.nemo_checkpoint, trainer, model)
    data = llm.PreTrainingDataModule(paths=[a.data], seq_length=a.seq_length,
                                     micro_batch_size=1, global_batch_size=1)
    data.val_dataloader = data.train_dataloader  # calibrate on the training split

    mcore = unwrap_model(model.module)  # megatron-core's GPTModel, NeMo's layer spec
    # Importance from NeMo's own forward loop (the estimator flushes under PP for you).
    scores = nm.estimate_importance(
        mcore, lambda _: llm.validate(model, data=data, trainer=trainer, tokenizer="model"))
    cfg = nm.ModelConfig.from_transformer_config(
        mcore.config, vocab_size=mcore.vocab_size, seq_length=a.seq_length,
        rotary_base=mcore.rotary_base,
        share_embeddings_and_output_weights=mcore.share_embeddings_and_output_weights)
    target = nm.Target(num_layers=a.target_num_layers, hidden_size=a.target_hidden_size,
                       ffn_hidden_size=a.target_ffn_hidden_size,
                       num_attention_heads=a.target_num_attention_heads,
                       num_query_groups=a.target_num_query_groups)
    plan = nm.make_plan(cfg, scores, target, a.tp, a.pp)
    pruned = nm.prune(mcore, plan)  # megatron-core GPTModel, same class and spec as mcore

    # Put the pruned model where NeMo keeps it, with its sizes in NeMo's config.
    if model.module is mcore:
        model.module = pruned
    else:  # Float16Module
        model.module.module = pruned
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "kv_channels", "layernorm_epsilon"):
        value = getattr(pruned.config, field)
        setattr(model.config, field, value)
        setattr(model.__io__.config, field, value)
    weights = ckpt_to_weights_subdir(a.save_path, is_saving=True)
    weights.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(trainer.strategy.megatron_parallel.sharded_state_dict(), weights)
    if is_global_rank_zero():
        TrainerContext.from_trainer(trainer).io_dump(ckpt_to_context_subdir(a.save_path),
                                                     yaml_attrs=["model"])
        scores.save(f"{a.save_path}/scores.pt")


if __name__ == "__main__":
    main()

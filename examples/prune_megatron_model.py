"""Prune a plain megatron-core ``GPTModel`` with nemo_minitron's library API.

The model is megatron-core's own (``TransformerConfig`` + ``GPTModel`` with
``get_gpt_layer_local_spec()``, ``common.py``). It is trained a few steps, or its weights are
loaded from a nemo_minitron checkpoint of the same shape (``--load``); then::

    scores = nm.estimate_importance(model, forward_loop)      # your own forward loop
    cfg = nm.ModelConfig.from_transformer_config(config, vocab_size=V, seq_length=S)
    plan = nm.make_plan(cfg, scores, nm.Target(...))
    pruned = nm.prune(model, plan)

and the validation loss is printed before and after pruning. With ``--distill-steps N`` the
pruned model is then distilled from the original in your own Megatron loop
(``get_forward_backward_func()`` with ``nm.KDLoss`` in the ``forward_step_func``), and with
``--save DIR`` saved with megatron-core's ``dist_checkpointing`` and read back into a fresh
``GPTModel``. ``nm.prune`` returns a new model
of your own class (here megatron-core's ``GPTModel``), built from your own layer spec and your
``TransformerConfig`` with the pruned sizes, under the same TP/PP layout; the scores
(``--scores-out``) are what ``nemo-minitron prune CKPT OUT scores=FILE`` takes.

    python examples/prune_megatron_model.py                    # synthetic tokens, 20 steps
    python examples/prune_megatron_model.py --data PREFIX --load CKPT --scores-out s.pt
    torchrun --nproc-per-node 2 examples/prune_megatron_model.py --tensor-model-parallel-size 2
    python examples/prune_megatron_model.py --distill-steps 10 --save /tmp/pruned_ckpt
"""

from __future__ import annotations

import argparse
import os

import torch
from common import (
    add_model_args,
    distill,
    gpt_model,
    lm_loss,
    megatron,
    positions,
    rank0,
    token_windows,
    train,
    transformer_config,
)

import nemo_minitron as nm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--load", help="a nemo_minitron checkpoint of this shape (else: train)")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--target-num-layers", type=int)
    p.add_argument("--target-hidden-size", type=int, default=48)
    p.add_argument("--target-ffn-hidden-size", type=int, default=64)
    p.add_argument("--scores-out", help="save the importance scores here")
    p.add_argument("--distill-steps", type=int, default=0,
                   help="KD steps of the pruned model from the original (nm.KDLoss)")
    p.add_argument("--save", help="an empty or new directory: the pruned (distilled) model, "
                                  "saved with megatron-core's dist_checkpointing")
    a = p.parse_args()

    tp = a.tensor_model_parallel_size
    with megatron(a.seed, tp) as device:
        config = transformer_config(a)
        model = gpt_model(config, a, device)
        # Calibration windows first, validation next, training windows after them.
        kd_windows = a.distill_steps * a.micro_batch_size
        windows = token_windows(a, a.calib_samples + a.valid_samples + kd_windows
                                + (0 if a.load else a.train_steps * a.micro_batch_size))
        calib = windows[:a.calib_samples]
        valid = windows[a.calib_samples:a.calib_samples + a.valid_samples]
        if a.load:
            nm.load_weights(a.load, model)
        else:
            first, last = train(model, windows[len(calib) + len(valid) + kd_windows:],
                                a.train_steps, a.micro_batch_size, a.lr)
            if rank0():
                print(f"training loss: {first:.6f} -> {last:.6f}")
        before = lm_loss(model, valid, a.micro_batch_size)

        def forward_loop(m: torch.nn.Module) -> None:  # the user's own forward passes
            m.eval()
            with torch.no_grad():
                for w in calib.to(device).split(a.micro_batch_size):
                    x = w[:, :-1]
                    m(x, positions(x), None)

        scores = nm.estimate_importance(model, forward_loop)
        if a.scores_out and rank0():
            scores.save(a.scores_out)
        cfg = nm.ModelConfig.from_transformer_config(config, vocab_size=a.vocab_size,
                                                     seq_length=a.seq_length)
        target = nm.Target(num_layers=a.target_num_layers, hidden_size=a.target_hidden_size,
                           ffn_hidden_size=a.target_ffn_hidden_size, hardware_multiple=16)
        plan = nm.make_plan(cfg, scores, target, tp)
        pruned = nm.prune(model, plan)
        # Your class, your layer spec, your config with the pruned sizes.
        assert type(pruned) is type(model)
        assert pruned.transformer_layer_spec is model.transformer_layer_spec
        assert pruned.config.hidden_size == a.target_hidden_size
        after = lm_loss(pruned, valid, a.micro_batch_size)
        count = lambda m: sum(t.numel() for t in m.parameters())  # noqa: E731
        if rank0():
            print(f"pruned model: {type(pruned).__module__}.{type(pruned).__name__}")
            print(f"kept layers: {plan.kept_layers}")
            print(f"parameters on rank 0: {count(model)} -> {count(pruned)}")
            print(f"validation loss before pruning: {before:.6f}")
            print(f"validation loss after pruning: {after:.6f}")
        if a.distill_steps:
            start = len(calib) + len(valid)
            first, last = distill(pruned, model, windows[start:start + kd_windows],
                                  a.distill_steps, a.micro_batch_size, a.lr)
            distilled = lm_loss(pruned, valid, a.micro_batch_size)
            if rank0():
                print(f"kd loss: {first:.6f} -> {last:.6f}")
                print(f"validation loss after distillation: {distilled:.6f}")
        if a.save:
            from megatron.core import dist_checkpointing

            os.makedirs(a.save, exist_ok=True)
            dist_checkpointing.save(pruned.sharded_state_dict(), a.save)
            fresh = gpt_model(pruned.config, a, device)  # your class, built from the saved files
            fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), a.save))
            reloaded = lm_loss(fresh, valid, a.micro_batch_size)
            if rank0():
                print(f"validation loss reloaded from {a.save}: {reloaded:.6f}")


if __name__ == "__main__":
    main()

"""Merge two megatron-core ``GPTModel``s in memory with ``nm.merge``.

Two stock models of one shape (``common.py``): loaded from nemo_minitron checkpoints
(``--load A --load B``), or trained a few steps from two seeds. Then::

    merged = nm.merge([model_a, model_b], method="slerp", t=0.3)   # full state dict
    model_c.load_state_dict(merged, strict=False)                  # TP=1: the full layout

``nm.merge`` applies the ``merge`` verb's per-tensor arithmetic (mergekit's SLERP, linear, task
arithmetic; q/k/v and gate/up each on their own) and returns the merged full (TP=1, PP=1) state
dict; ``_extra_state`` entries are not in it, hence ``strict=False``. The validation loss of
both inputs and of the merged model is printed.

    python examples/merge_in_memory.py                         # two seeds, synthetic tokens
    python examples/merge_in_memory.py --data PREFIX --load A --load B --t 0.3
"""

from __future__ import annotations

import argparse

import torch
from common import (
    add_model_args,
    gpt_model,
    lm_loss,
    megatron,
    token_windows,
    train,
    transformer_config,
)

import nemo_minitron as nm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--load", action="append", default=[],
                   help="a nemo_minitron checkpoint of this shape (twice; else: train two)")
    p.add_argument("--method", default="slerp", choices=["slerp", "linear"])
    p.add_argument("--t", type=float, default=0.5, help="slerp: 0 is the first model")
    a = p.parse_args()
    if len(a.load) not in (0, 2):
        p.error("give --load twice (the two models) or not at all")

    with megatron(a.seed) as device:
        config = transformer_config(a)
        models = []
        windows = token_windows(a, a.valid_samples + a.train_steps * a.micro_batch_size)
        valid, train_windows = windows[:a.valid_samples], windows[a.valid_samples:]
        for i in range(2):
            torch.manual_seed(a.seed + i)  # two different initialisations
            models.append(gpt_model(config, a, device))
            if a.load:
                nm.load_weights(a.load[i], models[-1])
            else:
                train(models[-1], train_windows, a.train_steps, a.micro_batch_size, a.lr)
        settings = {"t": a.t} if a.method == "slerp" else {"weights": [1 - a.t, a.t]}
        merged = nm.merge(models, method=a.method, **settings)
        model_c = gpt_model(config, a, device)
        missing, unexpected = model_c.load_state_dict(merged, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
        for name, m in (("first", models[0]), ("second", models[1]), ("merged", model_c)):
            loss = lm_loss(m, valid, a.micro_batch_size)
            print(f"validation loss of the {name} model: {loss:.6f}")


if __name__ == "__main__":
    main()

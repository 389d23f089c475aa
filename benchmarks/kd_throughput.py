"""Throughput of a full distillation training step (teacher forward, student forward and
backward, vocab-parallel KL, Megatron's optimizer step) in tokens/s and model FLOPs
utilisation (MFU), on one process.

On a GPU: bf16, Megatron's distributed optimizer over DDP grad buffers, the TE layer spec when
Transformer Engine is importable. On CPU (``--shape tiny``): the same code path in fp32, a dry
run of the script (CI runs it).

MFU counts the model FLOPs of the matmuls with their parameters (6 N per student token for
forward + backward, 2 N per teacher token for its forward; attention score FLOPs and the KL are
not counted, as in the usual 6ND convention) over the step time and ``--peak-tflops``
(default 989: H100/H200 SXM dense bf16).

    python benchmarks/kd_throughput.py [--shape 1b|tiny] [--steps 10] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import stat  # noqa: E402

# ~0.9B teacher (Llama-style, GQA), a width-pruned ~0.5B student.
ONE_B = dict(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
             num_query_groups=8, kv_channels=128, seq_length=2048, vocab_size=32000)
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            num_query_groups=2, kv_channels=16, seq_length=64, vocab_size=512)
SHAPES = {
    "1b": (ONE_B, dict(ONE_B, hidden_size=1536, ffn_hidden_size=4096), 4, 2),
    "tiny": (TINY, dict(TINY, hidden_size=48, ffn_hidden_size=96), 2, 2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the accelerator's dense peak (bf16 on GPU) for MFU")
    args = ap.parse_args()

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron.config import ModelConfig, ParallelConfig, TrainConfig
    from nemo_minitron.distill.objective import KDConfig, KDObjective
    from nemo_minitron.model.build import build_model, te_available
    from nemo_minitron.model.params import count_params
    from nemo_minitron.parallel.runtime import init_distributed, shutdown
    from nemo_minitron.train.optim import build_optimizer, wrap_ddp

    rt = init_distributed(ParallelConfig())
    gpu = rt.device.type == "cuda"
    t_shape, s_shape, mbs, n_micro = SHAPES[args.shape]
    t_cfg, s_cfg = ModelConfig(**t_shape), ModelConfig(**s_shape)
    teacher = build_model(t_cfg, bf16=gpu)
    student = build_model(s_cfg, bf16=gpu)
    teacher.eval()
    kd = KDObjective(teacher, student, KDConfig(), rt.device, pairs=[],
                     num_microbatches=n_micro)
    model = wrap_ddp(student, distributed_optimizer=gpu)
    train_cfg = TrainConfig(lr=1e-3, lr_warmup_iters=0, train_iters=args.steps + 2,
                            micro_batch_size=mbs, global_batch_size=mbs * n_micro)
    optimizer, scheduler = build_optimizer([model], train_cfg, bf16=gpu, distributed_optimizer=gpu)
    config = model.config
    config.no_sync_func = model.no_sync
    config.grad_scale_func = optimizer.scale_loss
    from megatron.core.distributed import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    s = t_cfg.seq_length
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, t_cfg.vocab_size, (mbs * n_micro, s + 1), generator=g)
    batches = [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(mbs, s),
                "position_ids": torch.arange(s).expand(mbs, s)} for t in toks.split(mbs)]
    fwd_bwd = get_forward_backward_func()

    def step() -> float:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = fwd_bwd(forward_step_func=kd.forward_step, data_iterator=iter(batches),
                      model=[model], num_microbatches=n_micro, seq_length=s,
                      micro_batch_size=mbs, forward_only=False)
        optimizer.step()
        scheduler.step(increment=1)
        return float(torch.stack([o[kd.metric_names[0]] for o in out]).mean())

    times, losses = [], []
    for i in range(args.steps + 2):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(step())
        if gpu:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    tokens = mbs * n_micro * s
    n_t, n_s = count_params(t_cfg), count_params(s_cfg)
    st = stat(times)
    flops = (6 * n_s + 2 * n_t) * tokens
    print(f"KD step, {'GPU ' + torch.cuda.get_device_name() if gpu else 'CPU'}, "
          f"{'bf16' if gpu else 'fp32'}, TE spec {te_available()}, teacher {n_t / 1e9:.2f}B "
          f"({t_cfg.num_layers}x{t_cfg.hidden_size}), student {n_s / 1e9:.2f}B "
          f"({s_cfg.num_layers}x{s_cfg.hidden_size}), {tokens} tokens/step:")
    print(f"  step time {st.fmt(' s', 1, 3)}")
    print(f"  tokens/s {tokens / st.median:,.0f} (median step)")
    print(f"  MFU {flops / st.median / (args.peak_tflops * 1e12):.1%} of "
          f"{args.peak_tflops:g} TFLOP/s (model FLOPs {flops / 1e12:.1f} TFLOP/step)")
    print(f"  KD loss first {losses[0]:.5g} -> last {losses[-1]:.5g}")
    if not all(torch.isfinite(torch.tensor(losses))):
        sys.exit("error: non-finite KD loss")
    if gpu:
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    shutdown()


if __name__ == "__main__":
    main()

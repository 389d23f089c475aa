"""What the examples share, written as a plain megatron-core user would: a ``TransformerConfig``
and a stock ``GPTModel`` with megatron-core's own ``get_gpt_layer_local_spec()``, token windows
from a Megatron indexed dataset (or synthetic ones), a short training loop and the validation
loss from ``GPTModel``'s own cross-entropy. Nothing here is nemo_minitron model code; the only
nemo_minitron piece is its CPU backend, which megatron-core needs on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

import nemo_minitron as nm


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model's shape (defaults: the tests' tiny teacher) and the data."""
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--ffn-hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-query-groups", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--data", help="Megatron indexed dataset prefix (no .bin/.idx); "
                                   "default: synthetic tokens")
    p.add_argument("--valid-samples", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=20,
                   help="training steps when a model is not loaded")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="TP size (run under torchrun --nproc-per-node N)")


@contextlib.contextmanager
def megatron(seed: int, tensor_model_parallel_size: int = 1) -> Iterator[torch.device]:
    """torch.distributed (one process, or torchrun's) and megatron-core's parallel state for
    the block; on a machine without a GPU inside nemo_minitron's CPU backend (scoped: left,
    and torch.cuda restored, at the end of the block)."""
    gpu = torch.cuda.is_available()
    with contextlib.ExitStack() as stack:
        if not gpu:
            stack.enter_context(nm.cpu_backend())
        backend = "nccl" if gpu else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        try:
            parallel_state.initialize_model_parallel(tensor_model_parallel_size)
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
            torch.manual_seed(seed)
            yield torch.device("cuda", torch.cuda.current_device()) if gpu \
                else torch.device("cpu")
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def transformer_config(a: argparse.Namespace) -> TransformerConfig:
    """A Llama-style config: RMSNorm, SwiGLU, GQA, no biases, no dropout."""
    return TransformerConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads, num_query_groups=a.num_query_groups,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=not torch.cuda.is_available(), bias_activation_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=a.tensor_model_parallel_size)


def gpt_model(config: TransformerConfig, a: argparse.Namespace,
              device: torch.device) -> GPTModel:
    """megatron-core's GPTModel with its own local layer spec, RoPE, untied output layer."""
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(
        normalization="RMSNorm"), vocab_size=a.vocab_size, max_sequence_length=a.seq_length,
        position_embedding_type="rope")
    return model.to(device)


def token_windows(a: argparse.Namespace, n: int) -> torch.Tensor:
    """``[n, seq_length + 1]`` tokens: consecutive windows of the dataset's documents joined
    in order, or Zipf-distributed synthetic tokens (something a few steps can learn)."""
    need = n * (a.seq_length + 1)
    if a.data:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds, parts, have = IndexedDataset(a.data), [], 0
        for i in range(len(ds)):
            parts.append(torch.from_numpy(ds[i].astype("int64")))
            have += len(parts[-1])
            if have >= need:
                break
        if have < need:
            raise SystemExit(f"error: --data {a.data} holds {have} tokens, {need} needed")
        return torch.cat(parts)[:need].view(n, -1)
    zipf = 1.0 / torch.arange(1, a.vocab_size + 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(a.seed)
    return torch.multinomial(zipf, need, replacement=True, generator=g).view(n, -1)


def rank0() -> bool:
    """Whether this process prints (every rank computes the same values)."""
    return dist.get_rank() == 0


def positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)


def lm_loss(model: torch.nn.Module, windows: torch.Tensor, micro_batch_size: int) -> float:
    """Mean next-token cross-entropy over ``windows`` (``GPTModel``'s own loss)."""
    device = next(model.parameters()).device
    model.eval()
    total = 0.0
    with torch.no_grad():
        for w in windows.to(device).split(micro_batch_size):
            x, y = w[:, :-1], w[:, 1:]
            total += model(x, positions(x), None, labels=y).float().sum().item()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def train(model: torch.nn.Module, windows: torch.Tensor, steps: int, micro_batch_size: int,
          lr: float) -> tuple[float, float]:
    """A few Adam steps on ``windows`` (cycled); returns the first and last training loss."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    batches = windows.split(micro_batch_size)
    for step in range(steps):
        w = batches[step % len(batches)].to(device)
        x, y = w[:, :-1], w[:, 1:]
        loss = model(x, positions(x), None, labels=y).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def distill(student: torch.nn.Module, teacher: torch.nn.Module, windows: torch.Tensor,
            steps: int, micro_batch_size: int, lr: float) -> tuple[float, float]:
    """A few KD steps of ``student`` from ``teacher`` in a plain Megatron loop: your optimizer,
    your batches, ``get_forward_backward_func()``; nemo_minitron's ``KDLoss`` (the ``distill``
    verb's loss: forward KL on the logits) is called from the ``forward_step_func``. Returns
    the first and last KD loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(student.parameters()).device
    kd = nm.KDLoss(student, teacher, nm.KDConfig())    # before the optimizer (see docs)
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    student.train()

    def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):  # noqa: ANN202
        return kd(next(data_iterator), model)

    losses = []
    batches = windows.split(micro_batch_size)
    for step in range(steps):
        w = batches[step % len(batches)].to(device)
        x, y = w[:, :-1], w[:, 1:]
        batch = {"tokens": x, "labels": y, "position_ids": positions(x),
                 "loss_mask": torch.ones(y.shape, device=device)}
        opt.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[student],
            num_microbatches=1, seq_length=x.shape[1], micro_batch_size=x.shape[0],
            forward_only=False)
        opt.step()
        losses.append(float(out[0]["kd loss"]))
    return losses[0], losses[-1]

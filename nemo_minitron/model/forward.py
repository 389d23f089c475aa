"""Forward passes through Megatron's pipeline schedule (so PP>1 works) without training."""

from __future__ import annotations

from collections.abc import Callable

import torch


def forward_pass(model: torch.nn.Module, tokens: torch.Tensor, *,
                 micro_batch_size: int | None = None,
                 collect: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list:
    """Run ``tokens [b, s]`` forward in micro-batches; on the last pipeline stage return
    ``collect(output)`` of every micro-batch (an empty list elsewhere or without ``collect``)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = tokens.shape
    mbs = micro_batch_size or b
    if b % mbs:
        raise ValueError(f"batch {b} is not divisible by micro_batch_size={mbs}")
    device = next(model.parameters()).device
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(mbs, s)
    chunks = iter(tokens.to(device).split(mbs))

    def step(data_iterator, m):
        out = m(next(data_iterator), position_ids, None)

        def on_output(output, non_loss_data=False):
            return collect(output) if collect is not None else output.new_zeros(())

        return out, on_output

    was_training = model.training
    model.eval()
    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=chunks, model=[model],
            num_microbatches=b // mbs, seq_length=s, micro_batch_size=mbs, forward_only=True,
            collect_non_loss_data=True,
        )
    model.train(was_training)
    return list(outs) if collect is not None else []


def forward_logits(model: torch.nn.Module, tokens: torch.Tensor,
                   micro_batch_size: int | None = None) -> torch.Tensor | None:
    """Full-vocabulary logits ``[b, s, vocab]`` (fp32) on the last pipeline stage, None on
    other stages. Vocab shards are gathered across tensor-parallel ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    outs = forward_pass(model, tokens, micro_batch_size=micro_batch_size,
                        collect=lambda o: gather_from_tensor_model_parallel_region(o).float())
    if not ps.is_pipeline_last_stage():
        return None
    return torch.cat(outs, dim=0)


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor, micro_batch_size: int) -> float:
    """Mean next-token loss of ``tokens [b, s + 1]`` (inputs ``[:, :-1]``, labels ``[:, 1:]``),
    known on every rank (reduced from the last pipeline stage)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    chunks = iter(labels.split(micro_batch_size))
    losses = forward_pass_with_labels(model, inputs, chunks, micro_batch_size)
    total = torch.tensor([sum(losses), float(len(losses))], dtype=torch.float64)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total[0] / total[1].clamp(min=1))


def forward_pass_with_labels(model: torch.nn.Module, inputs: torch.Tensor, labels_iter,
                             micro_batch_size: int) -> list[float]:
    """Per-micro-batch mean LM loss (last stage; empty elsewhere), computed inside GPTModel
    (vocab-parallel cross-entropy)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = inputs.shape
    device = next(model.parameters()).device
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(micro_batch_size, s)
    chunks = iter(inputs.to(device).split(micro_batch_size))

    def step(data_iterator, m):
        labels = next(labels_iter).to(device)
        out = m(next(data_iterator), position_ids, None, labels=labels)
        return out, lambda output, non_loss_data=False: output.float().mean()

    was_training = model.training
    model.eval()
    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=chunks, model=[model],
            num_microbatches=b // micro_batch_size, seq_length=s,
            micro_batch_size=micro_batch_size, forward_only=True, collect_non_loss_data=True)
    model.train(was_training)
    return [float(x) for x in outs]

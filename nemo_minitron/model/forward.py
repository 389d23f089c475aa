"""Forward passes through Megatron's pipeline schedule (so PP>1 works) without training."""

from __future__ import annotations

from collections.abc import Callable

import torch


def forward_pass(model: torch.nn.Module, tokens: torch.Tensor, *,
                 micro_batch_size: int | None = None,
                 collect: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 labels: torch.Tensor | None = None) -> list:
    """Run ``tokens [b, s]`` forward in micro-batches; on the last pipeline stage return
    ``collect(output)`` of every micro-batch (an empty list elsewhere or without ``collect``).
    With ``labels [b, s]`` the output is the per-token loss (vocab-parallel cross-entropy
    inside GPTModel) instead of the logits."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = tokens.shape
    mbs = micro_batch_size or b
    if b % mbs:
        raise ValueError(f"batch {b} is not divisible by micro_batch_size={mbs}")
    device = next(model.parameters()).device
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(mbs, s)
    chunks = iter(tokens.to(device).split(mbs))
    label_chunks = iter(labels.to(device).split(mbs)) if labels is not None else None

    def step(data_iterator, m):
        batch_labels = next(label_chunks) if label_chunks is not None else None
        out = m(next(data_iterator), position_ids, None, labels=batch_labels)

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

    losses = forward_pass(model, tokens[:, :-1], labels=tokens[:, 1:],
                          micro_batch_size=micro_batch_size, collect=lambda o: o.float().mean())
    total = torch.tensor([float(sum(losses)), float(len(losses))], dtype=torch.float64,
                         device=next(model.parameters()).device)  # NCCL reduces device tensors
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total[0] / total[1].clamp(min=1))

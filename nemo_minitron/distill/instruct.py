"""``distill`` on instruction data: the examples, chat template, response-only loss mask and
packing of ``sft`` (``train.sft.instruct_splits``, one owner), selected by ``instruct.data``.

Teacher and student read the same chat-formatted windows; the distillation loss is the masked
mean over the response tokens (the windows' ``loss_mask``), so prompt positions weigh exactly
zero. Packed windows carry ``segment_ids``; ``KDObjective`` turns them into the block-diagonal
attention mask for both models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from nemo_minitron.config import ConfigError, DataConfig, TrainConfig
from nemo_minitron.data.datasets import GPTSplits
from nemo_minitron.data.tokenizer import Tokenizer
from nemo_minitron.train.sft import SFTConfig, check_packing, instruct_splits

EMBEDDED = "embedded"


@dataclass(kw_only=True)
class InstructKDConfig(SFTConfig):
    """Instruction data for ``distill`` (the fields after ``data`` are ``sft``'s, same
    meaning)."""

    SECTION: ClassVar[str] = "instruct"

    data: str | None = None
    """Instruction JSONL (Alpaca or chat) to distill on, ``embedded`` for the embedded
    instruction set (its held-out files validate unless ``instruct.valid_data`` is given);
    null: pretraining-style data from the ``data`` section."""
    embedded_max_chars: int = 2000
    """With ``data: embedded``: the longest instruction + answer kept, in characters (the
    ``instruct-data --max-chars`` of the set)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embedded_max_chars <= 0:
            raise ConfigError(f"instruct.embedded_max_chars={self.embedded_max_chars} must be "
                              "a positive number")

    @property
    def enabled(self) -> bool:
        return self.data is not None


def check_instruct(cfg: InstructKDConfig, teacher_cache: str | None) -> None:
    """One-line errors for instruction distillation that cannot run."""
    if not cfg.enabled:
        return
    if teacher_cache is not None:  # the cache is keyed by indexed-dataset samples
        raise ConfigError("kd.teacher_cache reads pretraining-style data; it cannot be used "
                          "with instruct.data")
    check_packing(cfg)


def instruct_kd_splits(cfg: InstructKDConfig, data_cfg: DataConfig, tokenizer: Tokenizer,
                       seq_length: int, *, validate: bool) -> GPTSplits:
    """Training and validation windows of ``instruct.data`` (``data.seed`` orders them)."""
    from nemo_minitron.data.embedded_instruct import prepare_embedded_instruct

    assert cfg.data is not None
    path = cfg.data
    if path == EMBEDDED:
        path, valid = prepare_embedded_instruct(data_cfg, max_chars=cfg.embedded_max_chars)
        if cfg.valid_data is None:  # the set's own held-out files
            cfg = dataclasses.replace(cfg, valid_data=valid)
    return instruct_splits(cfg, path, tokenizer, seq_length, seed=data_cfg.seed,
                           validate=validate)


def teacher_response_loss(teacher: torch.nn.Module, valid_ds: Any, train_ds: Any,
                          t: TrainConfig) -> tuple[float, str, int]:
    """(loss, split, windows): the teacher's LM loss on the response tokens of the loop's own
    validation windows (their first ``eval_iters`` global batches; the training windows when
    there is no validation set), reduced as the loop reduces its ``lm loss`` (per micro-batch
    means, averaged), with the same per-example attention."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron.train.objectives import SFTObjective

    split, data = ("validation", valid_ds) if valid_ds is not None else ("training", train_ds)
    n = min(t.eval_iters * t.global_batch_size, len(data))
    mbs = min(t.micro_batch_size, n)
    n -= n % mbs
    batches = [{k: torch.stack([data[i][k] for i in range(j, j + mbs)]) for k in data[0]}
               for j in range(0, n, mbs)]
    device = next(teacher.parameters()).device
    teacher.eval()
    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=SFTObjective(device).forward_step, data_iterator=iter(batches),
            model=[teacher], num_microbatches=len(batches),
            seq_length=batches[0]["tokens"].shape[1], micro_batch_size=mbs, forward_only=True)
    total = torch.tensor([sum(float(o["sft loss"]) for o in outs), float(len(outs))],
                         dtype=torch.float64, device=device)  # only the last stage has outputs
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total[0] / total[1].clamp(min=1)), split, n


class Positioned(torch.utils.data.Dataset):
    """``dataset`` read by its position in the run: sample ``i`` is ``dataset[i % len]`` and
    the loop's ``sample_index`` is ``i`` itself (its length covers the whole run), a key that
    names one step, data-parallel rank and micro-batch: on-policy samples are seeded by it."""

    def __init__(self, dataset: Any, run_samples: int):
        self.dataset = dataset
        self.n = len(dataset)
        self.length = max(self.n, run_samples)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.dataset[i % self.n]

"""Megatron GPT datasets (train/valid/test through ``BlendedMegatronDatasetBuilder``) and the
deterministic, resumable micro-batch iterator of the training loop.

Sample order is a pure function of ``consumed_samples``: step ``s`` of a run with global batch
``G`` reads global samples ``[s*G, (s+1)*G)``; data-parallel rank ``r`` of ``D`` takes the
``r``-th contiguous ``G/D`` of them, in micro-batches. Resuming at ``consumed_samples`` therefore
replays exactly the data an uninterrupted run would have seen, and DP=2 with half the batch
each sees exactly the samples that one process with the whole batch sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from nemo_minitron.config import ConfigError
from nemo_minitron.data.indexed import check_indexed_prefix
from nemo_minitron.data.tokenizer import Tokenizer
from nemo_minitron.utils.logging import get_logger

log = get_logger("data.datasets")


@dataclass
class GPTSplits:
    """The three splits; a split with no documents is None."""

    train: torch.utils.data.Dataset | None
    valid: torch.utils.data.Dataset | None
    test: torch.utils.data.Dataset | None


def build_gpt_datasets(prefix: str, tokenizer: Tokenizer, *, seq_length: int, split: str,
                       seed: int, num_samples: tuple[int, int, int]) -> GPTSplits:
    """Build GPTDatasets of ``seq_length`` tokens (+1 for the shifted labels) per sample."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    check_indexed_prefix(prefix)
    _check_split_sizes(prefix, split, seq_length, num_samples)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split=split,
        path_to_cache=str(Path(prefix).parent / "index-cache"),
        tokenizer=tokenizer,  # duck-typed: Megatron reads .eod and .vocab_size
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, list(num_samples), lambda: True, config
    ).build()
    return GPTSplits(train, valid, test)


def _check_split_sizes(prefix: str, split: str, seq_length: int,
                       num_samples: tuple[int, int, int]) -> None:
    """Megatron loops forever on a split too small for one sample: refuse it up front."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(prefix)  # keep alive: sequence_lengths is a view of its mmap
    lengths = numpy.array(index.sequence_lengths, dtype=numpy.int64)
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, bounds, wanted in zip(("train", "valid", "test"), matrix, num_samples):
        if bounds is None or not wanted:
            continue
        beg, end = (int(round(b * len(lengths))) for b in bounds)
        tokens = int(lengths[beg:end].sum())
        if tokens < seq_length + 1:
            raise ConfigError(
                f"data.split={split!r}: the {name} split holds {end - beg} documents and "
                f"{tokens} tokens, fewer than seq_length + 1 = {seq_length + 1}"
            )


def micro_batches(dataset: torch.utils.data.Dataset, *, consumed_samples: int,
                  global_batch_size: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches for one global batch starting at ``consumed_samples``:
    ``tokens, labels, loss_mask, position_ids`` and the dataset indices ``sample_index``."""
    per_rank = global_batch_size // dp_size
    start = consumed_samples + dp_rank * per_rank
    n = len(dataset)  # type: ignore[arg-type]
    for m in range(0, per_rank, micro_batch_size):
        index = [(start + m + i) % n for i in range(micro_batch_size)]
        samples = [dataset[i] for i in index]
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask",
                                                                  "position_ids")}
        # which samples these are: what a teacher-logit cache is keyed by
        batch["sample_index"] = torch.tensor(index, dtype=torch.long)
        yield batch


def sequences(dataset: torch.utils.data.Dataset, n: int) -> torch.Tensor:
    """The first ``n`` samples as ``[n, seq_length + 1]`` token windows (inputs ``[:, :-1]``,
    labels ``[:, 1:]``), the form ``model.forward.lm_loss`` and importance estimation take."""
    return torch.stack([torch.cat([dataset[i]["tokens"], dataset[i]["labels"][-1:]])
                        for i in range(n)])

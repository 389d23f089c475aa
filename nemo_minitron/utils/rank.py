"""This process's global rank, the one answer to "am I rank 0?" for logging, printing a verb's
result and writing shared files."""

from __future__ import annotations

import os


def global_rank() -> int:
    """The process group's rank once it is started; before that (or after shutdown) the
    launcher's: ``RANK`` (torchrun), ``SLURM_PROCID`` (srun), else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def is_rank0() -> bool:
    """Whether this process is global rank 0."""
    return global_rank() == 0


def barrier() -> None:
    """Wait for every rank of the started process group (nothing to wait for without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()

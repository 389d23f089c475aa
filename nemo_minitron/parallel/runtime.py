"""The one place that starts ``torch.distributed`` and Megatron's parallel state.

Launch with ``torchrun`` (it sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT), with
``srun`` (SLURM_PROCID/SLURM_NTASKS), or as a single plain process. NCCL is used with a GPU,
gloo on CPU (where the CPU backend, ``parallel.cpu``, is entered first and left by
``shutdown``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_minitron.config import ParallelConfig
from nemo_minitron.utils.logging import get_logger

log = get_logger("parallel")


@dataclass(frozen=True)
class Runtime:
    """What a stage needs to know about the process layout."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    dp: int
    """Data-parallel size."""
    device: torch.device
    """Device of this rank."""

    @property
    def is_gpu(self) -> bool:
        """Whether this rank runs on a GPU."""
        return self.device.type == "cuda"


def use_gpu() -> bool:
    """A GPU is used whenever one is visible."""
    return torch.cuda.is_available()


def env_rank_world() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` as the launcher (torchrun, srun) gives them."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local = int(os.environ.get("SLURM_LOCALID", rank))
    else:
        rank, world, local = 0, 1, 0
    return rank, world, local


def init_distributed(parallel: ParallelConfig, seed: int = 1234) -> Runtime:
    """Start the process group and Megatron's parallel state; idempotent per layout.

    The data-parallel size is the world size divided by TP * PP.
    """
    from megatron.core import parallel_state as ps

    gpu = use_gpu()
    if not gpu:
        from nemo_minitron.parallel import cpu

        cpu.enter()
    rank, world, local = env_rank_world()
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    ep = parallel.expert_model_parallel_size
    if world % (tp * pp):
        from nemo_minitron.config import ConfigError

        raise ConfigError(
            f"parallel: tensor_model_parallel_size * pipeline_model_parallel_size = {tp * pp} "
            f"does not divide the world size {world}"
        )
    if (world // (tp * pp)) % ep:
        from nemo_minitron.config import ConfigError

        # Experts are split over data-parallel ranks (Megatron's expert layout).
        raise ConfigError(f"parallel.expert_model_parallel_size={ep} does not divide the "
                          f"data-parallel size {world // (tp * pp)} (world size {world} / "
                          f"(tensor * pipeline model-parallel size {tp * pp}))")
    if gpu:
        torch.cuda.set_device(local % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if gpu else "gloo"
        device_id = device if gpu else None
        if world == 1:
            # A lone process needs no rendezvous: an in-memory store, so no port is picked (an
            # inherited MASTER_PORT may be taken, and a port picked free can be taken by
            # another process before the store binds it).
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0,
                                    world_size=1, device_id=device_id)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    device_id=device_id)
    if ps.model_parallel_is_initialized() and (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
    ) != (tp, pp, ep):
        ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep, create_gloo_process_groups=True,
        )
    set_seed(seed)
    dp = ps.get_data_parallel_world_size()
    log.info("distributed: world=%d tp=%d pp=%d dp=%d backend=%s", world, tp, pp, dp,
             dist.get_backend())
    return Runtime(rank=rank, world_size=world, tp=tp, pp=pp, dp=dp, device=device)


def current_runtime() -> Runtime:
    """The ``Runtime`` of a process whose parallel state is already set up (by
    ``init_distributed`` or by a user's own Megatron script)."""
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        raise RuntimeError("torch.distributed and Megatron's parallel state must be initialised "
                           "first (nemo_minitron.parallel.runtime.init_distributed)")
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu() \
        else torch.device("cpu")
    return Runtime(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   tp=ps.get_tensor_model_parallel_world_size(),
                   pp=ps.get_pipeline_model_parallel_world_size(),
                   dp=ps.get_data_parallel_world_size(), device=device)


def set_seed(seed: int) -> None:
    """Seed every RNG; the pipeline stage offsets the seed as Megatron does."""
    import random

    import numpy as np
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down Megatron's parallel state and the process group; leave the CPU backend."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    if not use_gpu():
        from nemo_minitron.parallel import cpu

        cpu.exit()

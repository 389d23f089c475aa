"""The runtime's process-group start: a lone process takes no rendezvous port."""

from __future__ import annotations

import os
import socket

from tests.dist import spawn


def _start_beside_a_taken_port() -> None:
    import torch
    import torch.distributed as dist

    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.parallel.runtime import init_distributed

    with socket.socket() as taken:  # another process already listens on MASTER_PORT
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        os.environ["MASTER_PORT"] = str(taken.getsockname()[1])
        rt = init_distributed(ParallelConfig())
        assert (rt.world_size, dist.get_world_size()) == (1, 1)
        dist.barrier()
        t = torch.ones(2)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0]


def test_one_process_starts_with_its_master_port_taken():
    spawn(_start_beside_a_taken_port, 1)

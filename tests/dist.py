"""Run a test body in N fresh processes (spawned, gloo on CPU), as torchrun would.

Every multi-process test and every test that initialises Megatron's parallel state runs its
body here, so the pytest process itself never holds global parallel state.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple,
           errors: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:
        import torch

        torch.set_num_threads(1)
    try:
        fn(*args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        from nemo_minitron.parallel.runtime import shutdown

        shutdown()


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600) -> None:
    """Run ``fn(*args)`` on ``world_size`` ranks; raise with the first rank's traceback."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, errors))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    if not errors.empty():
        rank, tb = errors.get()
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        raise AssertionError(f"ranks exited with {codes}")


def in_order(steps: list[tuple[Callable[..., Any], tuple]]) -> None:
    """Run ``fn(*args)`` for each step, one after another in this process: several runs of one
    layout (or of layouts with the same world size) for the cost of one start-up. Each run
    sets up the parallel state it needs (``init_distributed`` re-lays out and re-seeds)."""
    for fn, args in steps:
        fn(*args)

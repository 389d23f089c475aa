"""Run a test body in N fresh processes (gloo on CPU), as torchrun would.

Every multi-process test and every test that initialises Megatron's parallel state runs its
body here, so the pytest process itself never holds global parallel state.

The processes are forked from a forkserver that has imported torch, megatron-core and this
package once (``context()``): a child starts in milliseconds instead of the ~4 s those imports
take, and no parallel state, process group or CPU backend exists before the fork (the server
only imports). A forked child would keep the server's environment and working directory, so
each child takes the caller's.
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


# Imported once by the forkserver: what nearly every child needs.
PRELOAD = ["torch", "torch.distributed", "megatron.core.models.gpt", "nemo_minitron.cli",
           "nemo_minitron.model.build", "nemo_minitron.parallel.runtime", "pytest"]


def context() -> Any:
    """The multiprocessing context of every child the tests start (see the module docstring)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts: once per pytest process
    return ctx


def adopt(env: dict[str, str], cwd: str) -> None:
    """In a forked child: take the caller's environment and working directory. OpenMP read
    OMP_NUM_THREADS when the server imported torch, so a different value is applied here."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if env.get("OMP_NUM_THREADS", "").isdigit():
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple,
           errors: Any, env: dict[str, str], cwd: str) -> None:
    adopt(env, cwd)
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
    ctx = context()
    errors = ctx.Queue()
    port = _free_port()
    env, cwd = dict(os.environ), os.getcwd()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, errors, env, cwd))
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

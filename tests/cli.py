"""The command line run in the pytest process: ``--help`` and the one-line errors of input that
is refused before any parallel state exists. Tests of exit codes across a process boundary,
``torchrun`` and runs that train use ``tests.test_cli.run_cli`` (a child process) instead."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Result:
    """What a child process would have shown: exit status, stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _logs_to(stream: io.StringIO) -> Iterator[None]:
    handlers = [h for h in logging.getLogger("nemo_minitron").handlers
                if isinstance(h, logging.StreamHandler)]
    old = [h.setStream(stream) for h in handlers]
    try:
        yield
    finally:
        for h, s in zip(handlers, old):
            h.setStream(s)


def assert_no_global_state() -> None:
    """The pytest process holds no process group, parallel state or CPU backend (they would
    leak into every later test; see tests/dist.py)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_minitron.parallel import cpu

    assert not cpu.active(), "the CPU backend was installed in the pytest process"
    assert not dist.is_initialized(), "torch.distributed was initialised in the pytest process"
    assert not ps.model_parallel_is_initialized(), "parallel state left in the pytest process"


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """``nemo_minitron.cli.main(args)`` in this process, with ``env`` set for the call."""
    from nemo_minitron.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)  # restored whole: a runtime start would set MASTER_PORT & co.
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _logs_to(err):
            try:
                rc = main(list(args))
            except SystemExit as e:  # argparse: --help (0) and usage errors (2)
                rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert_no_global_state()
    return Result(rc, out.getvalue(), err.getvalue())

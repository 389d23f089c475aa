"""The command line run in the pytest process (``cli``): ``--help`` and the one-line errors of
input that is refused before any parallel state exists. Runs that train, and exit codes across a
process boundary, use ``run_cli``: the same ``main`` in a child forked from the tests'
forkserver (``tests.dist.context``), which is ``python -m nemo_minitron`` without the ~4 s of
imports. ``tests.test_cli`` keeps true ``python -m`` and ``torchrun`` runs."""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from tests.dist import _free_port, adopt, context


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
    saved = dict(os.environ)  # restored whole: a runtime start may set MASTER_ADDR & co.
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


def _main_in_child(args: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    adopt(env, cwd)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
    sys.argv = ["nemo-minitron", *args]
    from nemo_minitron.cli import main

    try:
        code = main(args)
    finally:
        atexit._run_exitfuncs()  # what the interpreter does at exit; a forked child skips it
    sys.exit(code)


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """``nemo-minitron ARGS`` in a child process (forked, see the module docstring): its exit
    status, stdout and stderr, as ``subprocess.run(..., capture_output=True, text=True)``."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        for path in (out, err):
            open(path, "w").close()
        proc = context().Process(target=_main_in_child, args=(
            list(args), dict(os.environ if env is None else env), os.getcwd(), out, err))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["nemo-minitron", *args], timeout)
        with open(out) as f_out, open(err) as f_err:
            return subprocess.CompletedProcess(["nemo-minitron", *args], proc.exitcode,
                                               f_out.read(), f_err.read())


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m nemo_minitron ARGS`` in a new interpreter (imports and all)."""
    return subprocess.run([sys.executable, "-m", "nemo_minitron", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def run_torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
         "--master-port", str(_free_port()), "-m", "nemo_minitron", *args],
        capture_output=True, text=True, timeout=300)


def _one_line_error(res: subprocess.CompletedProcess | Result, *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]

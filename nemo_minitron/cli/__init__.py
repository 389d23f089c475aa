"""``nemo-minitron`` command line: one module per verb or per subpackage (``demo``,
``bench_method``, ``data``, ``train``, ``distill``, ``prune``, ``search``, ``launch``,
``interop``, ``eval``, ``merge``, ``specdec``, ``selfdistill``), each defining its verbs'
arguments; ``nemo_minitron.verbs`` lists the verbs, their order and their module.

Every verb that trains takes a YAML recipe and ``section.key=value`` overrides. User errors
print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import signal
import sys

from nemo_minitron import verbs
from nemo_minitron.cli import (
    bench_method,
    data,
    demo,
    distill,
    eval,
    interop,
    launch,
    merge,
    prune,
    search,
    selfdistill,
    specdec,
    train,
)
from nemo_minitron.cli.common import show_defaults
from nemo_minitron.config import ConfigError
from nemo_minitron.utils.logging import get_logger, quiet_known_warnings, setup_logging
from nemo_minitron.utils.rank import is_rank0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-minitron",
        description="Minitron structured pruning and knowledge distillation on Megatron-core. "
                    "Multi-process runs: torchrun --nproc-per-node N -m nemo_minitron <verb> ...",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="verb")
    for verb in verbs.VERBS:  # the registry's order is --help's
        MODULES[verb.cli].VERBS[verb.name](sub)
    show_defaults(sub)
    return parser


MODULES = {m.__name__.rpartition(".")[2]: m for m in (
    bench_method, data, demo, distill, eval, interop, launch, merge, prune, search, selfdistill,
    specdec, train)}
"""The command-line modules by name (``verbs.Verb.cli``)."""


def main(argv: list[str] | None = None) -> int:
    quiet_known_warnings()  # the program's own filters: importing the package sets none
    setup_logging()
    # SLURM's USR1 says the time limit is near. The training loop turns it into a checkpoint
    # and a stop (its own handler); anywhere else (building data, pruning, after the last
    # step) finishing beats dying of it, which would fail a job whose work is done.
    with contextlib.suppress(ValueError):  # ValueError: called off the main thread
        signal.signal(signal.SIGUSR1, _usr1_outside_training)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling the overrides at the first option; key=value words after
    # options are overrides too.
    if extra and isinstance(getattr(args, "overrides", None), list) \
            and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "decodes", False):  # before anything imports torch (utils.omp)
        from nemo_minitron.utils.omp import prefer_spinning_threads

        prefer_spinning_threads()
    rank0 = is_rank0()  # before the process group starts: the launcher's rank
    try:
        return args.func(args)
    except (ConfigError, FileExistsError) as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full, read-only or forbidden output location
        cause = _os_error(e)
        if cause is None:
            raise
        if rank0:
            print(f"error: {cause}", file=sys.stderr)
        return 2
    except Exception as e:  # training errors carry their own one-line cause
        from nemo_minitron.train.loop import TrainingError
        from nemo_minitron.train.pretrain import Stopped

        if isinstance(e, Stopped):  # EX_TEMPFAIL: not finished, not failed; run it again
            if rank0:
                print(f"stopped: {e}", file=sys.stderr)
            return 75
        if isinstance(e, TrainingError):
            if rank0:
                print(f"error: {e}", file=sys.stderr)
            return 3
        raise
    finally:
        if "megatron.core" in sys.modules:  # launch/validate never start torch.distributed
            from nemo_minitron.parallel.runtime import shutdown

            shutdown()


def _usr1_outside_training(_signum: int, _frame: object) -> None:
    get_logger("cli").info("USR1 outside a training loop: nothing to checkpoint; carrying on")


def _os_error(e: OSError) -> str | None:
    """The one-line cause of an OS error about where we write, else ``None``."""
    where = e.filename or "the output"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device holding {where}"
    if e.errno == errno.EROFS:
        return f"cannot write {where}: read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM) and e.filename:
        return f"cannot write {where}: permission denied"
    return None


if __name__ == "__main__":
    sys.exit(main())

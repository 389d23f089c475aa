"""``nemo-minitron`` command line: one verb per stage, each registered by the module of its
package (``demo``, ``train``, ``prune``, ``launch``, ``interop``).

Every verb that trains takes a YAML recipe and ``section.key=value`` overrides. User errors
print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from nemo_minitron.cli import demo, interop, launch, prune, train
from nemo_minitron.config import ConfigError
from nemo_minitron.utils.logging import setup_logging
from nemo_minitron.utils.rank import is_rank0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-minitron",
        description="Minitron structured pruning and knowledge distillation on Megatron-core. "
                    "Multi-process runs: torchrun --nproc-per-node N -m nemo_minitron <verb> ...",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="verb")
    for module in (demo, train, prune, launch, interop):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling the overrides at the first option; key=value words after
    # options are overrides too.
    if extra and isinstance(getattr(args, "overrides", None), list) \
            and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    rank0 = is_rank0()  # before the process group starts: the launcher's rank
    try:
        return args.func(args)
    except (ConfigError, FileExistsError) as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # training errors carry their own one-line cause
        from nemo_minitron.train.loop import TrainingError

        if isinstance(e, TrainingError):
            if rank0:
                print(f"error: {e}", file=sys.stderr)
            return 3
        raise
    finally:
        if "megatron.core" in sys.modules:  # launch/validate never start torch.distributed
            from nemo_minitron.parallel.runtime import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())

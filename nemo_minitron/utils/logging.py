"""Rank-0 logging: every module logs through ``get_logger``; only global rank 0 prints INFO."""

from __future__ import annotations

import logging
import sys
import warnings

from nemo_minitron.utils.rank import is_rank0

_ROOT = "nemo_minitron"


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return is_rank0()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (it may be replaced after setup, e.g. when
    ``cli.main`` runs in-process under a capturing caller)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the package logger once: timestamped lines on stderr, rank 0 only."""
    root = logging.getLogger(_ROOT)
    if getattr(root, "_nm_configured", False):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
    handler.addFilter(_RankZeroFilter())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    root._nm_configured = True  # type: ignore[attr-defined]


KNOWN_WARNINGS = (
    # megatron-core warns on import when Transformer Engine / apex are absent: the expected CPU
    # configuration, whose fallbacks are what we use.
    ".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*",
    "full scope is deprecated.*",
    # torch.distributed.checkpoint deprecations triggered inside megatron's dist_checkpointing.
    ".*`load_state_dict` is deprecated.*",
    "Please use DTensor instead.*",
    # Every sequence-parallel linear layer (MoE training under TP) advises a CUDA launch-queue
    # setting: meaningless on CPU; on GPU docs/moe.md says to export it, as Megatron-LM does.
    "When using sequence parallelism it is recommended to set the environment variable "
    "CUDA_DEVICE_MAX_CONNECTIONS.*",
)
"""Messages of warnings the command line hides (``quiet_known_warnings``)."""


def quiet_known_warnings() -> None:
    """Hide ``KNOWN_WARNINGS`` for the rest of the process: the command line's console stays
    clean. Called where the command line starts (``cli.main``), never on import, so a library
    user's process keeps its own warning filters."""
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def get_logger(name: str) -> logging.Logger:
    """A child of the package logger (``nemo_minitron.<name>``)."""
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


_warned: set[str] = set()


def warn_once(logger: logging.Logger, msg: str) -> None:
    """Warn about the user's settings (the same on every rank) once per process, from rank 0:
    a check may run several times (a verb's early validation, then the library function it
    calls)."""
    if msg not in _warned and is_rank0():
        _warned.add(msg)
        logger.warning(msg)


def fmt_duration(seconds: float) -> str:
    """``H:MM:SS`` of a duration (an ETA), negatives as zero."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"

"""Shared fixtures, built once per session: a small embedded corpus, recipe overrides for a
tiny model, one briefly trained tiny teacher checkpoint and a student for it (read-only: a test
that changes one copies it first)."""

from __future__ import annotations

import os

import pytest
import torch

from nemo_minitron.config import DataConfig
from nemo_minitron.data.embedded import prepare_embedded
from tests.dist import spawn
from tests.helpers.data import MOE_MODEL, SMALL_DATA, TINY_MODEL
from tests.helpers.train import pretrain_job


def pytest_configure(config) -> None:
    """Under pytest-xdist the cores are shared by the workers: each (and every process it
    starts, through OMP_NUM_THREADS) gets its share of threads instead of all of them, which
    would oversubscribe the cores several times over."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        share = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


HEAVY = ("slow", "slurm", "dist")
"""Markers of costly tests, heaviest first (dist: spawned processes)."""


def _weight(items: list) -> int:
    """Heaviness class of a group of tests: the index in ``HEAVY`` of its heaviest marker, or
    ``len(HEAVY)`` for a group with none."""
    marks = {m for item in items for m in HEAVY if item.get_closest_marker(m)}
    return next((i for i, m in enumerate(HEAVY) if m in marks), len(HEAVY))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Groups for pytest-xdist's ``--dist loadgroup`` (``scripts/test`` runs ``-n``): a test
    module runs whole on one worker, so its module-scoped fixtures are built once; every
    ``slurm`` test runs on one worker, since they share one cluster of one node (jobs of two
    workers would queue behind each other and miss their timeouts). ``tryfirst``: xdist's own
    hook turns the markers into groups, so they must exist before it runs.

    Heavy groups first (``_weight``; ``scripts/test`` passes ``--no-loadscope-reorder`` so that
    xdist keeps this order instead of putting the groups with most tests first): the last
    group a worker picks up is then a light one, not a minute-long end-to-end test."""
    groups: dict[str, list] = {}
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
        groups.setdefault(group, []).append(item)
    order = sorted(groups.values(), key=_weight)  # stable: collection order within a class
    items[:] = [item for group in order for item in group]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """Cache dir holding the small embedded corpus (tokenizer + indexed dataset)."""
    cache = str(tmp_path_factory.mktemp("nm-cache"))
    prepare_embedded(DataConfig(cache_dir=cache, **SMALL_DATA))
    return cache


@pytest.fixture(scope="session")
def embedded_paths(data_cache) -> tuple[str, str]:
    """``(indexed-dataset prefix, tokenizer file)`` of the small embedded corpus."""
    return prepare_embedded(DataConfig(cache_dir=data_cache, **SMALL_DATA))


@pytest.fixture(scope="session")
def tiny_overrides(data_cache) -> list[str]:
    """Overrides for a tiny model on the small corpus, fast enough for unit tests."""
    return TINY_MODEL + [
        f"data.cache_dir={data_cache}",
        f"data.tokenizer_vocab_size={SMALL_DATA['tokenizer_vocab_size']}",
        f"data.corpus_max_bytes={SMALL_DATA['corpus_max_bytes']}",
        "train.micro_batch_size=4", "train.global_batch_size=8", "train.log_interval=1",
        "train.eval_iters=2", "train.tensorboard=false",
    ]


@pytest.fixture(scope="session")
def teacher(tmp_path_factory, tiny_overrides) -> str:
    """A 4-layer tiny teacher (hidden 64, ffn 128, 4 heads in 2 groups, vocab 1024: 279,104
    parameters) after 20 steps at lr 3e-3: the source of the prune, distill, search, launch
    tests. Read-only."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    spawn(pretrain_job, 1, str(out), tiny_overrides + [
        "model.num_layers=4", "train.train_iters=20", "train.eval_interval=0", "train.lr=3e-3"])
    return str(out / "checkpoints" / "step_0000020")


@pytest.fixture(scope="session")
def pair(tmp_path_factory, tiny_overrides, teacher) -> tuple[str, str]:
    """``(teacher, student)``: the session's 4-layer teacher (hidden 64) and a 2-layer student
    (hidden 32) after one step. Read-only."""
    root = tmp_path_factory.mktemp("kd")
    spawn(pretrain_job, 1, str(root / "s"), tiny_overrides + [
        "model.hidden_size=32", "train.train_iters=1", "train.eval_interval=0"])
    return teacher, str(root / "s" / "checkpoints" / "step_0000001")


@pytest.fixture(scope="session")
def moe_teacher(tmp_path_factory, tiny_overrides) -> str:
    """A 2-layer tiny mixture of experts (hidden 64, 4 experts of width 32, top-2, router
    losses on; vocab 1024: 205,632 parameters, 181,056 active) after 3 steps at lr 3e-3 (no
    warm-up): the source of the MoE distill and search tests. Read-only."""
    out = tmp_path_factory.mktemp("moe_teacher") / "run"
    spawn(pretrain_job, 1, str(out), tiny_overrides + MOE_MODEL + [
        "train.train_iters=3", "train.eval_interval=0", "train.lr=3e-3",
        "train.lr_warmup_iters=0"])
    return str(out / "checkpoints" / "step_0000003")


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Each test starts with no warning printed yet (``utils.logging.warn_once`` prints each
    once per process)."""
    from nemo_minitron.utils import logging as nm_logging

    nm_logging._warned.clear()


@pytest.fixture
def nm_log(caplog):
    """The messages logged through ``nemo_minitron``'s loggers (which do not propagate to
    the root logger) at WARNING and above, as a function returning them so far."""
    import logging

    from nemo_minitron.utils.logging import setup_logging

    setup_logging()
    root = logging.getLogger("nemo_minitron")
    root.addHandler(caplog.handler)
    yield lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                   and r.name.startswith("nemo_minitron")]
    root.removeHandler(caplog.handler)


@pytest.fixture(autouse=True)
def _restore_environ():
    """Every test leaves ``os.environ`` as it found it (an in-process verb that starts the
    runtime may set MASTER_ADDR, which child processes would otherwise inherit)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)

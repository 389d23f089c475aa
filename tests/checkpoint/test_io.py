"""Checkpoint directories (``nemo_minitron/checkpoint/io.py``): a save round-trips the exact
weights, config and train state; it is written under ``<ckpt>.tmp`` and renamed into place (an
old checkpoint stays whole until then); ``latest_checkpoint`` picks the newest complete one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from nemo_minitron.checkpoint.io import check_checkpoint, is_checkpoint, latest_checkpoint
from nemo_minitron.config import ConfigError
from tests.dist import spawn

CFG = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
           num_query_groups=2, seq_length=16, vocab_size=128)


def _complete(path: Path) -> Path:
    (path / "weights").mkdir(parents=True)
    (path / "model_config.yaml").write_text("num_layers: 2\n")
    return path


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None  # no checkpoints/ at all
    root = tmp_path / "checkpoints"
    root.mkdir()
    assert latest_checkpoint(tmp_path) is None
    _complete(root / "step_0000009")
    want = _complete(root / "step_0000010")
    _complete(root / "step_0000011.tmp")  # a save in progress (or crashed)
    _complete(root / "step_0000012.old")  # a replaced one being removed
    (root / "step_0000013" / "weights").mkdir(parents=True)  # no model_config.yaml
    (root / "step_0000014").mkdir()
    (root / "step_0000014" / "model_config.yaml").write_text("num_layers: 2\n")  # no weights
    assert latest_checkpoint(tmp_path) == want
    assert not is_checkpoint(root / "step_0000013") and not is_checkpoint(root / "step_0000014")


def test_check_checkpoint_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        check_checkpoint(tmp_path / "nope", field="teacher")
    assert str(e.value) == f"teacher={str(tmp_path / 'nope')!r} does not exist"
    with pytest.raises(ConfigError) as e:
        check_checkpoint(tmp_path)
    assert str(e.value) == (f"checkpoint={str(tmp_path)!r} is not a nemo_minitron checkpoint "
                            "(no model_config.yaml and weights/)")
    assert check_checkpoint(_complete(tmp_path / "ck")) == tmp_path / "ck"


def save_load_job(root: str) -> None:
    import random

    import numpy as np
    import torch
    from megatron.core import dist_checkpointing

    from nemo_minitron.checkpoint import io
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()
                if not k.endswith("_extra_state")}

    # Where each save writes its weights, and what is in place at that moment.
    writes: list[tuple[str, bool, bool]] = []
    real_save = dist_checkpointing.save

    def spy(state: dict, path: str, *a: object, **k: object) -> None:
        final = Path(path).parent.with_name(Path(path).parent.name.removesuffix(".tmp"))
        writes.append((path, final.exists(), io.is_checkpoint(final)))
        real_save(state, path, *a, **k)

    dist_checkpointing.save = spy
    init_distributed(ParallelConfig(), seed=5)
    cfg = ModelConfig(**CFG)
    model = build_model(cfg)
    saved = weights(model)
    run = Path(root) / "run"
    ck = run / "checkpoints" / "step_0000003"
    stale = _complete(ck.with_name(ck.name + ".tmp"))  # left behind by a crashed save
    (stale / "junk").write_text("x")
    assert io.latest_checkpoint(run) is None

    assert io.save_checkpoint(ck, model, model_cfg=cfg, tokenizer=None,
                              train_state={"step": 3, "consumed_samples": 24}) == ck
    assert writes == [(str(ck) + ".tmp/weights", False, False)]  # nothing in place meanwhile
    assert sorted(p.name for p in ck.parent.iterdir()) == ["step_0000003"]
    assert not (ck / "junk").exists()  # the stale directory was not reused
    assert sorted(p.name for p in ck.iterdir()) == ["manifest.json", "model_config.yaml", "rng",
                                                    "train_state.json", "weights"]
    assert sorted(p.name for p in (ck / "rng").iterdir()) == ["rank_00000.pt"]
    assert json.loads((ck / "train_state.json").read_text()) == {"step": 3,
                                                                 "consumed_samples": 24}
    assert yaml.safe_load((ck / "model_config.yaml").read_text())["hidden_size"] == 32
    assert io.load_model_config(ck) == cfg
    assert io.latest_checkpoint(run) == ck

    # A fresh model with other random weights loads exactly the saved ones.
    init_distributed(ParallelConfig(), seed=6)
    other = build_model(cfg)
    assert any(not torch.equal(v, saved[k]) for k, v in weights(other).items())
    io.load_weights(ck, other)
    got = weights(other)
    assert got.keys() == saved.keys()
    assert all(torch.equal(got[k], saved[k]) for k in saved)

    # No silent overwrite; with overwrite=True the old checkpoint stays whole until the rename.
    with pytest.raises(FileExistsError):
        io.save_checkpoint(ck, other, model_cfg=cfg, tokenizer=None)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    changed = weights(other)
    writes.clear()
    io.save_checkpoint(ck, other, model_cfg=cfg, tokenizer=None, overwrite=True)
    assert writes == [(str(ck) + ".tmp/weights", True, True)]
    assert sorted(p.name for p in ck.parent.iterdir()) == ["step_0000003"]
    third = build_model(cfg)
    io.load_weights(ck, third)
    assert all(torch.equal(v, changed[k]) for k, v in weights(third).items())

    # The RNG state round-trips: the same draws after restoring it.
    state = io.get_rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3).tolist())
    io.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), torch.rand(3).tolist()) == first


def test_save_load_and_atomic_replace(tmp_path):
    spawn(save_load_job, 1, str(tmp_path))


def save_without_manager_job(out: str) -> None:
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from nemo_minitron.checkpoint.io import load_weights, save_checkpoint
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(), seed=1)
    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                      vocab_size=64, seq_length=8)
    model = build_model(cfg)
    save_checkpoint(out, model, model_cfg=cfg, tokenizer=None)
    # A synchronous save starts no multiprocessing manager (megatron-core's queue for
    # asynchronous saves) and leaves megatron-core's module state as it found it.
    assert multiprocessing.active_children() == []
    assert filesystem_async._results_queue is None
    other = build_model(cfg)
    load_weights(out, other)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        if not k.endswith("_extra_state"):
            assert torch.equal(a, b), k


def test_a_save_starts_no_manager_process_and_reads_back(tmp_path):
    spawn(save_without_manager_job, 1, str(tmp_path / "ck"))

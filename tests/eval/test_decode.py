"""The shared KV-cache decode loop (``eval.decode``): every step's logits, through Megatron's
cached path (``generate``, ``bench``), the masked one (speculative decoding, with a rollback)
and without a cache, equal the model's own forward over the whole sequence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist import spawn

CFG = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
           num_query_groups=2, kv_channels=16, seq_length=32, vocab_size=96)
START, END = 5, 14


def _walk(cache, tokens, ref, start: int) -> float:
    """Largest difference from ``ref`` of the logits ``decode_steps`` yields from ``start``."""
    import torch

    from nemo_minitron.eval.decode import decode_steps

    work = tokens.clone()
    work[:, start:] = 0  # each step must see only what the loop wrote
    err = 0.0
    with torch.no_grad():
        for p, logits in decode_steps(cache, work, start, END):
            err = max(err, float((logits.float() - ref[:, p - 1]).abs().max()))
            work[:, p] = tokens[:, p]  # teacher forcing: the reference's tokens
    return err


def decode_job(root: str) -> None:
    import torch

    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.eval.decode import KVCache
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed
    from tests.interop.hfmodels import randomize

    init_distributed(ParallelConfig(), seed=3)
    errors: dict[str, float] = {}
    for attention in ("local", "sdpa"):
        model = build_model(ModelConfig(**CFG), use_te=False, attention=attention)
        randomize(model, seed=7)
        model.eval()
        tokens = torch.randint(0, CFG["vocab_size"], (3, END),
                               generator=torch.Generator().manual_seed(1))
        pos = torch.arange(END).unsqueeze(0).expand(3, END)
        with torch.no_grad():
            ref = model(tokens, pos, None, runtime_gather_output=True).float()

        for name, kw in (("megatron", {}), ("masked", {"masked": True}),
                         ("uncached", {"enabled": False})):
            errors[f"{attention}_{name}"] = _walk(KVCache(model, 3, END, **kw), tokens, ref,
                                                  START)
        cache = KVCache(model, 3, END, masked=True)
        _walk(cache, tokens, ref, START)
        cache.valid = 8  # roll back past positions 8.. and decode them again
        errors[f"{attention}_rollback"] = _walk(cache, tokens, ref, 9)
    (Path(root) / "errors.json").write_text(json.dumps(errors))


@pytest.fixture(scope="module")
def errors(tmp_path_factory) -> dict[str, float]:
    root = tmp_path_factory.mktemp("decode")
    spawn(decode_job, 1, str(root))
    return json.loads((root / "errors.json").read_text())


def test_every_decode_path_equals_the_full_forward(errors):
    assert len(errors) == 8
    for name, err in errors.items():
        assert err < 1e-4, (name, err)

"""Layout equivalence of the real Megatron model on CPU/gloo: TP=2 and PP=2 give the TP=1
logits, and checkpoints saved under one layout load under another with identical logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist import in_order, spawn
from tests.helpers.layouts import logits_job

CFG = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
           num_query_groups=2, seq_length=32, vocab_size=256)


TIED = [False, True]


def cfg(tied: bool) -> dict:
    return {**CFG, "share_embeddings_and_output_weights": tied}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every layout's logits, three start-ups in all: the 2-process layouts (and their
    checkpoints), then the one-process reference and loads, then PP=2 loading the PP=1 save."""
    d = tmp_path_factory.mktemp("layouts")

    def p(name: str) -> str:
        return str(d / name)

    spawn(in_order, 2, [
        *((logits_job, (p(f"tp2-{t}.pt"), cfg(t), 2, 1, None, p(f"ck_tp2-{t}"))) for t in TIED),
        (logits_job, (p("pp2.pt"), CFG, 1, 2, None, p("ck_pp2")))])
    spawn(in_order, 1, [
        *((logits_job, (p(f"tp1-{t}.pt"), cfg(t), 1, 1, None, None)) for t in TIED),
        *((logits_job, (p(f"tp1_from_tp2-{t}.pt"), cfg(t), 1, 1, p(f"ck_tp2-{t}"), None))
          for t in TIED),
        (logits_job, (p("pp1.pt"), CFG, 1, 1, p("ck_pp2"), p("ck_pp1")))])
    spawn(logits_job, 2, p("pp2_back.pt"), CFG, 1, 2, p("ck_pp1"), None)
    return d


@pytest.mark.dist
@pytest.mark.parametrize("tied", TIED)
def test_tp2_logits_equal_tp1_and_checkpoint_reshards(runs, tied):
    # TP=2: weights drawn on CPU as full master weights then split, so the same seed gives the
    # same model as TP=1; its checkpoint then loads into TP=1.
    ref = torch.load(runs / f"tp1-{tied}.pt")
    assert ref.shape == (4, 32, 256)
    torch.testing.assert_close(torch.load(runs / f"tp2-{tied}.pt"), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.load(runs / f"tp1_from_tp2-{tied}.pt"), ref, atol=1e-5,
                               rtol=0)


@pytest.mark.dist
def test_pp2_checkpoint_loads_into_pp1_and_back(runs):
    ref = torch.load(runs / "pp2.pt")
    torch.testing.assert_close(torch.load(runs / "pp1.pt"), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.load(runs / "pp2_back.pt"), ref, atol=1e-5, rtol=0)

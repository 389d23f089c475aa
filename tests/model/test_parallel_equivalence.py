"""Layout equivalence of the real Megatron model on CPU/gloo: TP=2 and PP=2 give the TP=1
logits, and checkpoints saved under one layout load under another with identical logits."""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist import spawn

CFG = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
           num_query_groups=2, seq_length=32, vocab_size=256)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def logits_job(out: str, tp: int, pp: int, ckpt_in: str | None, ckpt_out: str | None,
               tied: bool) -> None:
    from nemo_minitron.checkpoint.io import load_weights, save_checkpoint
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp,
                                    pipeline_model_parallel_size=pp), seed=7)
    cfg = ModelConfig(**CFG, share_embeddings_and_output_weights=tied)
    model = build_model(cfg)
    if ckpt_in:
        load_weights(ckpt_in, model)
    logits = forward_logits(model, _tokens(), micro_batch_size=2)
    if ckpt_out:
        save_checkpoint(ckpt_out, model, model_cfg=cfg, tokenizer=None)
    if logits is not None and int(os.environ["RANK"]) == torch.distributed.get_world_size() - 1:
        torch.save(logits, out)


@pytest.mark.dist
@pytest.mark.parametrize("tied", [False, True])
def test_tp2_logits_equal_tp1_and_checkpoint_reshards(tmp_path, tied):
    # TP=2: weights drawn on CPU as full master weights then split, so the same seed gives the
    # same model as TP=1; its checkpoint then loads into TP=1.
    spawn(logits_job, 2, str(tmp_path / "tp2.pt"), 2, 1, None, str(tmp_path / "ck_tp2"), tied)
    spawn(logits_job, 1, str(tmp_path / "tp1.pt"), 1, 1, None, None, tied)
    spawn(logits_job, 1, str(tmp_path / "tp1_from_tp2.pt"), 1, 1, str(tmp_path / "ck_tp2"),
          None, tied)
    ref = torch.load(tmp_path / "tp1.pt")
    assert ref.shape == (4, 32, 256)
    torch.testing.assert_close(torch.load(tmp_path / "tp2.pt"), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.load(tmp_path / "tp1_from_tp2.pt"), ref, atol=1e-5, rtol=0)


@pytest.mark.dist
def test_pp2_checkpoint_loads_into_pp1_and_back(tmp_path):
    spawn(logits_job, 2, str(tmp_path / "pp2.pt"), 1, 2, None, str(tmp_path / "ck_pp2"), False)
    spawn(logits_job, 1, str(tmp_path / "pp1.pt"), 1, 1, str(tmp_path / "ck_pp2"),
          str(tmp_path / "ck_pp1"), False)
    spawn(logits_job, 2, str(tmp_path / "pp2_back.pt"), 1, 2, str(tmp_path / "ck_pp1"), None,
          False)
    ref = torch.load(tmp_path / "pp2.pt")
    torch.testing.assert_close(torch.load(tmp_path / "pp1.pt"), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.load(tmp_path / "pp2_back.pt"), ref, atol=1e-5, rtol=0)

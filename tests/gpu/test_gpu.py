"""GPU paths (run by ``scripts/gpu_check`` on a GPU machine; skipped elsewhere): NCCL with one
process, bf16 pretraining against the fp32 run of the same seed, a KD step with Megatron's
distributed optimizer against its plain optimizer, and the Transformer Engine spec with FP8
against bf16 when TE is importable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist import spawn

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _nccl_job() -> None:
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.parallel.runtime import init_distributed

    rt = init_distributed(ParallelConfig())
    assert rt.device.type == "cuda" and dist.get_backend() == "nccl"
    x = torch.arange(6.0, device=rt.device)
    dist.all_reduce(x)
    assert torch.equal(x.cpu(), torch.arange(6.0))
    y = tensor_parallel.gather_from_tensor_model_parallel_region(x.view(2, 3))
    assert torch.equal(y.cpu(), torch.arange(6.0).view(2, 3))


def test_nccl_one_process():
    spawn(_nccl_job, 1)


def _pretrain_job(out: str, overrides: list[str]) -> None:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.train.pretrain import pretrain

    pretrain(load_recipe(None, overrides), out)


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lm loss"] for r in rows if r["kind"] == "train"}


def test_bf16_pretraining_tracks_fp32(tmp_path, tiny_overrides):
    """bf16 mixed precision learns like fp32 from the same seed and data."""
    common = tiny_overrides + ["train.train_iters=30", "train.eval_interval=0", "train.lr=3e-3"]
    spawn(_pretrain_job, 1, str(tmp_path / "bf16"), common + ["train.bf16=true"])
    spawn(_pretrain_job, 1, str(tmp_path / "fp32"), common + ["train.bf16=false"])
    bf16, fp32 = _losses(tmp_path / "bf16"), _losses(tmp_path / "fp32")
    assert all(torch.isfinite(torch.tensor(list(bf16.values()))))
    assert bf16[30] < bf16[1] - 0.5  # it learns
    assert abs(bf16[30] - fp32[30]) < 0.1 * fp32[30]


def _kd_optimizer_job(out: str) -> None:
    import copy

    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron.config import ModelConfig, ParallelConfig, TrainConfig
    from nemo_minitron.distill.objective import KDConfig, KDObjective
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.train.optim import build_optimizer, wrap_ddp

    rt = init_distributed(ParallelConfig())
    shape = dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                 num_query_groups=2, seq_length=128, vocab_size=1024)
    teacher = build_model(ModelConfig(**shape), bf16=True)
    base = build_model(ModelConfig(**dict(shape, hidden_size=96, ffn_hidden_size=192,
                                          kv_channels=32)), bf16=True)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 1024, (8, 129), generator=g)
    batches = [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(4, 128),
                "position_ids": torch.arange(128).expand(4, 128)} for t in toks.split(4)]
    cfg = TrainConfig(lr=1e-3, lr_warmup_iters=0, train_iters=3, micro_batch_size=4,
                      global_batch_size=8)
    result = {}
    for distributed in (True, False):
        student = copy.deepcopy(base)
        kd = KDObjective(teacher, student, KDConfig(), rt.device, pairs=[], num_microbatches=2)
        model = wrap_ddp(student, distributed_optimizer=distributed)
        opt, sched = build_optimizer([model], cfg, bf16=True, distributed_optimizer=distributed)
        model.config.no_sync_func = model.no_sync
        model.config.grad_scale_func = opt.scale_loss
        model.config.finalize_model_grads_func = finalize_model_grads
        losses = []
        for _ in range(3):
            model.zero_grad_buffer()
            opt.zero_grad()
            out_ = get_forward_backward_func()(
                forward_step_func=kd.forward_step, data_iterator=iter(batches), model=[model],
                num_microbatches=2, seq_length=128, micro_batch_size=4, forward_only=False)
            ok, _, _ = opt.step()
            assert ok
            sched.step(increment=1)
            losses.append(float(torch.stack([o[kd.metric_names[0]] for o in out_]).mean()))
        result["distributed" if distributed else "plain"] = losses
    Path(out).write_text(json.dumps(result))


def test_kd_step_distributed_optimizer_matches_plain(tmp_path):
    """Megatron's distributed optimizer (bf16 params, fp32 main weights sharded over DP) takes
    the same KD steps as its plain optimizer."""
    spawn(_kd_optimizer_job, 1, str(tmp_path / "kd.json"))
    r = json.loads((tmp_path / "kd.json").read_text())
    assert r["plain"][2] < r["plain"][0]
    for a, b in zip(r["distributed"], r["plain"], strict=True):
        assert abs(a - b) <= 2e-2 * abs(b) + 1e-4


def _fp8_job(out: str) -> None:
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.model.build import build_model, te_available
    from nemo_minitron.model.forward import lm_loss
    from nemo_minitron.parallel.runtime import init_distributed

    rt = init_distributed(ParallelConfig())
    assert te_available()
    shape = ModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=512,
                        num_attention_heads=4, num_query_groups=2, seq_length=128,
                        vocab_size=1024)
    torch.manual_seed(0)
    bf16 = build_model(shape, bf16=True)
    fp8 = build_model(shape, bf16=True, fp8="hybrid")
    assert "TELayerNormColumnParallelLinear" in type(
        fp8.decoder.layers[0].self_attention.linear_qkv).__name__
    fp8.load_state_dict(bf16.state_dict())
    toks = torch.randint(0, 1024, (16, 129), generator=torch.Generator().manual_seed(0))
    a, b = lm_loss(bf16, toks.to(rt.device), 8), lm_loss(fp8, toks.to(rt.device), 8)
    Path(out).write_text(json.dumps({"bf16": a, "fp8": b}))


def test_te_spec_fp8_matches_bf16(tmp_path):
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    spawn(_fp8_job, 1, str(tmp_path / "fp8.json"))
    r = json.loads((tmp_path / "fp8.json").read_text())
    assert abs(r["fp8"] - r["bf16"]) < 0.05 * r["bf16"]

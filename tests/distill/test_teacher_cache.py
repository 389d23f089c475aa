"""Offline teacher logits: the top-k loss against a direct recomputation of the coarse-grained
KL (and the full-vocabulary KL when k covers it), vocab-parallel shards against one process,
and distillation from a cache against distillation with the live teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nemo_minitron.config import ConfigError
from nemo_minitron.distill.cache_kl import cached_forward_kl, vocab_parallel_topk
from nemo_minitron.distill.losses import logit_divergence
from nemo_minitron.distill.objective import KDConfig
from tests.dist import spawn
from tests.helpers.train import state_dicts_job


def _logits(n: int = 37, v: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * 2,
            torch.randn(n, v, generator=g, dtype=torch.float64) * 3)


def _reference(zs: torch.Tensor, zt: torch.Tensor, k: int) -> torch.Tensor:
    """The coarse-grained forward KL written out: buckets = the teacher's top k + the rest."""
    lt, ls = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
    ids = lt.topk(k, -1).indices
    pt_k, ps_k = lt.gather(-1, ids).exp(), ls.gather(-1, ids).exp()
    pt = torch.cat([pt_k, (1 - pt_k.sum(-1, keepdim=True)).clamp(min=0)], -1)
    ps = torch.cat([ps_k, 1 - ps_k.sum(-1, keepdim=True)], -1)
    return torch.where(pt > 1e-12, pt * (pt.clamp(min=1e-300).log() - ps.log()), 0.0).sum(-1)


@pytest.mark.parametrize("chunk", [None, 5])
def test_full_k_equals_full_vocabulary_kl(chunk):
    zs, zt = _logits()
    zs1, zs2 = zs.clone().requires_grad_(True), zs.clone().requires_grad_(True)
    ids, logp, tail = vocab_parallel_topk(zt, zt.shape[-1], None)
    assert bool(torch.isneginf(tail).all())  # nothing outside the vocabulary
    got = cached_forward_kl(zs1, ids, logp, tail, chunk_tokens=chunk)
    want = logit_divergence(zs2, zt, chunk_tokens=chunk)
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    w = torch.linspace(0.5, 1.5, zs.shape[0], dtype=torch.float64)
    (got * w).sum().backward()
    (want * w).sum().backward()
    assert torch.allclose(zs1.grad, zs2.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", [1, 8, 49])
def test_top_k_equals_coarse_grained_kl_and_bounds_it(k):
    zs, zt = _logits(seed=k)
    a, b = zs.clone().requires_grad_(True), zs.clone().requires_grad_(True)
    ids, logp, tail = vocab_parallel_topk(zt, k, None)
    got = cached_forward_kl(a, ids, logp, tail, chunk_tokens=7)
    want = _reference(b, zt, k)
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    full = logit_divergence(zs, zt, chunk_tokens=None)
    assert bool((got <= full + 1e-12).all()) and bool((got >= -1e-12).all())
    got.sum().backward()
    want.sum().backward()
    assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-10)


def test_topk_ids_and_log_probs():
    _, zt = _logits()
    ids, logp, tail = vocab_parallel_topk(zt, 5, None)
    lt = F.log_softmax(zt, -1)
    top = lt.topk(5, -1)
    assert torch.equal(ids.long(), top.indices)
    assert torch.allclose(logp, top.values, rtol=0, atol=1e-12)
    rest = lt.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    assert torch.allclose(tail, rest, rtol=0, atol=1e-12)


def _sharded_job(out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    zs, zt = _logits(n=11, v=40)
    half = slice(20 * rank, 20 * (rank + 1))
    res = {}
    for k in (40, 6):
        ids, logp, tail = vocab_parallel_topk(zt[:, half].contiguous(), k, dist.group.WORLD)
        ref_ids, ref_logp, ref_tail = vocab_parallel_topk(zt, k, None)
        mine = zs[:, half].clone().requires_grad_(True)
        loss = cached_forward_kl(mine, ids, logp, tail, chunk_tokens=4, group=dist.group.WORLD)
        loss.sum().backward()
        full = zs.clone().requires_grad_(True)
        ref = cached_forward_kl(full, ref_ids, ref_logp, ref_tail, chunk_tokens=4)
        ref.sum().backward()
        res[k] = {"ids": torch.equal(ids, ref_ids), "logp": float((logp - ref_logp).abs().max()),
                  "tail": bool(torch.isneginf(tail).all()) if k == 40
                  else float((tail - ref_tail).abs().max()),
                  "loss": float((loss - ref).abs().max()),
                  "grad": float((mine.grad - full.grad[:, half]).abs().max())}
    Path(f"{out}.{rank}").write_text(json.dumps(res))


@pytest.mark.dist
def test_vocab_parallel_shards_equal_one_process(tmp_path):
    spawn(_sharded_job, 2, str(tmp_path / "r"))
    for rank in (0, 1):
        for k, r in json.loads((tmp_path / f"r.{rank}").read_text()).items():
            assert r["ids"], (rank, k)
            assert r["tail"] is True if k == "40" else r["tail"] < 1e-10, (rank, k)
            assert max(r["logp"], r["loss"], r["grad"]) < 1e-10, (rank, k, r)


def test_cache_refuses_losses_it_cannot_serve():
    with pytest.raises(ConfigError, match="kd.hidden_weight"):
        KDConfig(teacher_cache="x", hidden_weight=1.0)
    with pytest.raises(ConfigError, match="kd.temperature"):
        KDConfig(teacher_cache="x", temperature=2.0)


def _e2e_job(root: str, teacher: str, student: str, overrides: list[str], vocab: int) -> None:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.distill.cache_build import build_teacher_cache
    from nemo_minitron.distill.stage import DistillRecipe, distill

    def recipe(extra: list[str]) -> DistillRecipe:
        return load_recipe(None, overrides + extra, cls=DistillRecipe)

    r = Path(root)
    no_eval = ["train.eval_interval=0"]
    build_teacher_cache(teacher, recipe([]), r / "cache_full", vocab)
    build_teacher_cache(teacher, recipe(no_eval), r / "cache_16", 16)  # no validation samples
    summaries = {
        "online": distill(recipe([]), teacher, student, r / "online"),
        "full": distill(recipe([f"kd.teacher_cache={r / 'cache_full'}"]), teacher, student,
                        r / "full"),
        "k16": distill(recipe([f"kd.teacher_cache={r / 'cache_16'}", *no_eval]), teacher,
                       student, r / "k16"),
    }
    try:  # a run that validates refuses a cache built without validation
        distill(recipe([f"kd.teacher_cache={r / 'cache_16'}"]), teacher, student, r / "refused")
        (r / "refused.txt").write_text("not refused")
    except ConfigError as e:
        (r / "refused.txt").write_text(str(e))
    try:  # a cache of another teacher (here: the student's weights as the teacher) is refused
        distill(recipe([f"kd.teacher_cache={r / 'cache_full'}"]), student, student, r / "other")
        (r / "other.txt").write_text("not refused")
    except ConfigError as e:
        (r / "other.txt").write_text(str(e))
    (r / "teacher_loss.json").write_text(json.dumps(
        {k: v["teacher_valid_loss"] for k, v in summaries.items()}))


def _rows(run: Path, kind: str = "train") -> dict[int, dict[str, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == kind}


def test_distill_from_cache_equals_live_teacher(tmp_path, pair, tiny_overrides):
    """k = the padded vocabulary: the same losses and weights as running the teacher; k = 16:
    the first step's loss (same weights) is at most the full KL."""
    from nemo_minitron.checkpoint.io import load_model_config

    teacher, student = pair
    vocab = load_model_config(teacher).vocab_size
    data = [o for o in tiny_overrides if o.startswith("data.")]
    overrides = data + ["train.train_iters=3", "train.micro_batch_size=2",
                        "train.global_batch_size=4", "train.eval_interval=2",
                        "train.eval_iters=2",
                        "train.log_interval=1", "train.tensorboard=false", "train.lr=1e-3",
                        "train.lr_warmup_iters=0", "kd.chunk_tokens=50"]
    spawn(_e2e_job, 1, str(tmp_path), teacher, student, overrides, vocab)
    online, full, k16 = (_rows(tmp_path / n) for n in ("online", "full", "k16"))
    for step in (1, 2, 3):
        for name in ("kd loss", "lm loss", "loss"):
            assert abs(full[step][name] - online[step][name]) < 1e-5, (step, name)
    # Validation reads the cache's valid/ samples: the same losses as the live teacher's.
    v_online, v_full = _rows(tmp_path / "online", "valid"), _rows(tmp_path / "full", "valid")
    assert sorted(v_online) == sorted(v_full) and len(v_online) >= 2
    for step in v_online:
        for name in ("kd loss", "lm loss"):
            assert abs(v_full[step][name] - v_online[step][name]) < 1e-5, (step, name)
    assert "validation samples" in (tmp_path / "refused.txt").read_text()
    meta = json.loads((tmp_path / "cache_full" / "meta.json").read_text())
    other = (tmp_path / "other.txt").read_text()
    assert f"was built from teacher {teacher!r} (weights fingerprint " \
           f"{meta['teacher_fingerprint']}), not from --teacher {student!r}" in other, other
    assert not (tmp_path / "other").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "cache" in p.name) == \
        ["cache_16", "cache_full"]  # built aside and renamed: no partial directory left
    assert 0 < k16[1]["kd loss"] <= online[1]["kd loss"] + 1e-6  # a lower bound of the KL
    names = ("online", "full")
    spawn(state_dicts_job, 1, [str(tmp_path / n / "checkpoints" / "step_0000003") for n in names],
          [str(tmp_path / f"{n}.pt") for n in names])
    a, b = torch.load(tmp_path / "online.pt"), torch.load(tmp_path / "full.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    losses = json.loads((tmp_path / "teacher_loss.json").read_text())
    assert abs(losses["full"] - losses["online"]) < 1e-6

"""On-policy distillation (``kd.on_policy``, ``kd.divergence=gjsd``): the generalized JSD
against a dense torch recomputation at beta 0, 0.3, 0.5, 1 and forward/reverse KL at its ends,
one process and TP=2 (values and gradients); one on-policy step on the student's own samples
against a torch recomputation of the loss and its gradient; TP=2 samples equal TP=1's for the
same seed; an interrupted on-policy run resumes exactly; bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.dist import in_order, spawn
from tests.helpers.data import _examples
from tests.helpers.distill import _metrics
from tests.helpers.train import _copy_metrics

BETAS = [0.0, 0.3, 0.5, 1.0]


def dense_gjsd(zs: torch.Tensor, zt: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token generalized JSD (TRL's ``generalized_jsd_loss``) from full-vocabulary logits:
    the mixture ``m = beta p_t + (1 - beta) p_s``, ``beta KL(p_t||m) + (1 - beta) KL(p_s||m)``;
    forward KL at beta 0, reverse KL at beta 1."""
    ls, lt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    if beta == 0.0:
        return F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    if beta == 1.0:
        return F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    ps, pt = ls.exp(), lt.exp()
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * (lt - m.log())).sum(-1) + (1 - beta) * (ps * (ls - m.log())).sum(-1)


def _logits(n: int = 24, v: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (3 * torch.randn(n, v, generator=g, dtype=torch.float64),
            3 * torch.randn(n, v, generator=g, dtype=torch.float64))


def _ours(zs, zt, beta, kind="gjsd", group=None):
    from nemo_minitron.distill.losses import logit_divergence

    zs = zs.clone().requires_grad_(True)
    per = logit_divergence(zs, zt, kind=kind, beta=beta, chunk_tokens=7, group=group)
    w = torch.linspace(0.5, 1.5, per.numel(), dtype=per.dtype)  # a non-uniform upstream grad
    (per * w).sum().backward()
    return per.detach(), zs.grad


def _dense(zs, zt, beta):
    zs = zs.clone().requires_grad_(True)
    per = dense_gjsd(zs, zt, beta)
    (per * torch.linspace(0.5, 1.5, per.numel(), dtype=per.dtype)).sum().backward()
    return per.detach(), zs.grad


@pytest.mark.parametrize("beta", BETAS)
def test_gjsd_equals_dense_recomputation(beta):
    zs, zt = _logits()
    got, g_got = _ours(zs, zt, beta)
    want, g_want = _dense(zs, zt, beta)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(g_got, g_want, atol=1e-10, rtol=1e-9)
    assert float(want.min()) > 1e-3  # the distributions differ: the check can fail


def test_gjsd_ends_are_forward_and_reverse_kl():
    zs, zt = _logits()
    ls, lt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    fwd = (lt.exp() * (lt - ls)).sum(-1)  # KL(p_t || p_s)
    rev = (ls.exp() * (ls - lt)).sum(-1)  # KL(p_s || p_t)
    torch.testing.assert_close(_ours(zs, zt, 0.0)[0], fwd, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(_ours(zs, zt, 1.0)[0], rev, atol=1e-10, rtol=1e-9)
    # the existing divergences are the same functions; js is the generalized JSD at 0.5
    for kind, beta in (("forward", 0.0), ("reverse", 1.0), ("js", 0.5)):
        a, b = _ours(zs, zt, beta, kind=kind), _ours(zs, zt, beta)
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # close to the ends the interior formula tends to beta-weighted KL, not to the ends
    assert float((_ours(zs, zt, 1e-6)[0] - fwd).abs().min()) > 1e-3


def _tp_gjsd_job(out: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.layouts import vocab_range
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    rank, group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    zs, zt = _logits(v=50)
    lo, hi = vocab_range(25, rank)
    diffs = {}
    for beta in BETAS:
        got, g_got = _ours(zs[:, lo:hi], zt[:, lo:hi], beta, group=group)
        want, g_want = _dense(zs, zt, beta)
        diffs[str(beta)] = max(float((got - want).abs().max()),
                               float((g_got - g_want[:, lo:hi]).abs().max()))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(diffs))


@pytest.mark.dist
def test_gjsd_tp2_equals_dense_recomputation(tmp_path):
    spawn(_tp_gjsd_job, 2, str(tmp_path / "d.json"))
    diffs = json.loads((tmp_path / "d.json").read_text())
    assert sorted(diffs) == sorted(map(str, BETAS))
    assert max(diffs.values()) < 1e-10, diffs


# ----------------------------------------------------------------------------- one step
MAX_NEW = 8
STEP_BETAS = [0.0, 0.5, 1.0]


def _step_job(teacher_ckpt: str, student_ckpt: str, data: str, out: str, tp: int) -> None:
    """One on-policy micro-batch: the student's samples, then the objective's loss and
    gradient against a dense torch recomputation on the same samples (TP=1)."""
    import torch.distributed as dist

    from nemo_minitron.checkpoint.io import (
        load_checkpoint_tokenizer,
        load_model,
        load_model_config,
    )
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.data.instruct import build_sft_dataset, read_jsonl, render_example
    from nemo_minitron.distill.objective import KDConfig, KDObjective
    from nemo_minitron.distill.on_policy import OnPolicyConfig, OnPolicySampler
    from nemo_minitron.eval.generate import SamplingConfig, generate
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp))
    tok = load_checkpoint_tokenizer(student_ckpt)
    teacher, student = (load_model(c)[0] for c in (teacher_ckpt, student_ckpt))
    exs = read_jsonl(data)[:2]
    ds = build_sft_dataset(exs, tok, load_model_config(student_ckpt).seq_length, pack=False)
    batch = {k: torch.stack([ds[i][k] for i in range(2)]) for k in ds[0]}
    sampling = SamplingConfig(greedy=False, max_new_tokens=MAX_NEW, seed=0)
    sampler = OnPolicySampler(OnPolicyConfig(fraction=1.0, sampling=sampling), eod=tok.eod,
                              stop_tokens=tok.eos_ids, vocab_limit=tok.vocab_size)
    new = sampler.resample(batch, student, seed=11)
    res: dict = {"tokens": new["tokens"].tolist()}
    prompts = [tok.encode(render_example(tok, e)[0]) for e in exs]
    res["prompts_kept"] = all(new["tokens"][i, :len(p)].tolist() == p
                              for i, p in enumerate(prompts))
    mask = None
    if tp == 1:  # the sampled positions from the prompt lengths and the generator's own rows
        rows = generate(student, prompts, dataclasses.replace(sampling, seed=11,
                                                              stop_tokens=tok.eos_ids),
                        vocab_limit=tok.vocab_size)
        res["sampled"] = [len(r) for r in rows]
        mask = torch.zeros(new["loss_mask"].shape)
        for i, (p, r) in enumerate(zip(prompts, rows)):
            n = len(r) + (len(r) < MAX_NEW)  # a stopped row learns its stop token too
            mask[i, len(p) - 1:len(p) - 1 + n] = 1
        res["mask_equal"] = bool(torch.equal(mask, new["loss_mask"]))
    # Every token a stop token: each row stops at once and learns the end of sequence alone.
    stop = OnPolicySampler(OnPolicyConfig(fraction=1.0, sampling=dataclasses.replace(
        sampling, stop_tokens=list(range(tok.vocab_size)))), eod=tok.eod, stop_tokens=[],
        vocab_limit=tok.vocab_size).resample(batch, student, seed=11)
    res["stopped_rows_learn_eod"] = all(
        stop["labels"][i, len(p) - 1] == tok.eod and stop["loss_mask"][i].sum() == 1
        and stop["loss_mask"][i, len(p) - 1] == 1 for i, p in enumerate(prompts))
    for beta in STEP_BETAS:  # the ends are forward and reverse KL (dense_gjsd's F.kl_div)
        kd = KDObjective(teacher, student, KDConfig(divergence="gjsd", beta=beta),
                         torch.device("cpu"), pairs=[])
        student.zero_grad(set_to_none=True)
        o, loss_func = kd.step(new, student)
        loss = loss_func(o)[0]
        loss.backward()
        res[f"loss{beta}"] = float(loss)
        if mask is None:
            continue
        grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        student.zero_grad(set_to_none=True)
        with torch.no_grad():
            zt = teacher(new["tokens"], new["position_ids"], None).double()
        zs = student(new["tokens"], new["position_ids"], None).double()
        want = (dense_gjsd(zs, zt, beta) * mask).sum() / mask.sum()
        want.backward()
        res[f"loss_diff{beta}"] = float((loss.double() - want).abs())
        res[f"grad_diff{beta}"] = max(float((grads[n] - p.grad).abs().max())
                                      for n, p in student.named_parameters())
        res[f"grad_max{beta}"] = max(float(g.abs().max()) for g in grads.values())
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(res))


KD = ["train.micro_batch_size=2", "train.global_batch_size=4", "train.train_iters=3",
      "train.lr=1e-3", "train.lr_warmup_iters=0", "train.eval_interval=0",
      "train.log_interval=1", "train.tensorboard=false", "instruct.valid_fraction=0",
      "data.seed=7", "kd.divergence=gjsd", "kd.beta=0.5", "kd.on_policy.fraction=0.5",
      f"kd.on_policy.sampling.max_new_tokens={MAX_NEW}", "kd.teacher_max_loss_ratio=1.5"]


def distill_job(out: str, teacher: str, student: str, overrides: list[str]) -> None:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.distill.stage import DistillRecipe, distill

    distill(load_recipe(None, overrides, cls=DistillRecipe), teacher, student, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pair, tiny_overrides) -> Path:
    teacher, student = pair
    root = tmp_path_factory.mktemp("on-policy")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in _examples()))
    kd = [o for o in tiny_overrides if o.startswith("data.")] + KD + [f"instruct.data={data}"]
    spawn(in_order, 1, [
        (_step_job, (teacher, student, str(data), str(root / "step1.json"), 1)),
        (distill_job, (str(root / "ref"), teacher, student, kd)),
        (distill_job, (str(root / "off"), teacher, student, kd + ["kd.on_policy.fraction=0"])),
        (distill_job, (str(root / "cut"), teacher, student, kd + ["train.exit_interval=2"])),
        (_copy_metrics, (str(root / "cut"), str(root / "first.jsonl"))),
        (distill_job, (str(root / "cut"), teacher, student, kd))])
    return root


def test_on_policy_step_equals_torch_recomputation(runs):
    r = json.loads((runs / "step1.json").read_text())
    assert r["prompts_kept"] and r["mask_equal"] and r["stopped_rows_learn_eod"]
    assert all(n > 0 for n in r["sampled"]), r["sampled"]
    for beta in STEP_BETAS:
        assert r[f"loss{beta}"] > 1e-3 and r[f"loss_diff{beta}"] < 1e-5, (beta, r)
        assert r[f"grad_max{beta}"] > 1e-4 and r[f"grad_diff{beta}"] < 1e-5, (beta, r)
    assert r["loss0.0"] != pytest.approx(r["loss1.0"], abs=1e-4)  # forward is not reverse


@pytest.mark.dist
def test_tp2_and_dp2_equal_one_process(runs, pair, tiny_overrides):
    """TP=2 draws the same samples as TP=1 for the same seed; whole on-policy runs under TP=2
    and DP=2 (each rank samples its own micro-batches, seeded by their positions in the run,
    which DP=1 gives the same micro-batches) reproduce one process."""
    teacher, student = pair
    kd = [o for o in tiny_overrides if o.startswith("data.")] + KD + [
        f"instruct.data={runs / 'data.jsonl'}"]
    spawn(in_order, 2, [
        (_step_job, (teacher, student, str(runs / "data.jsonl"), str(runs / "step2.json"), 2)),
        (distill_job, (str(runs / "tp2"), teacher, student,
                       kd + ["parallel.tensor_model_parallel_size=2"])),
        (distill_job, (str(runs / "dp2"), teacher, student, kd))])
    one, two = (json.loads((runs / f"step{n}.json").read_text()) for n in (1, 2))
    assert two["tokens"] == one["tokens"]
    for beta in STEP_BETAS:
        assert two[f"loss{beta}"] == pytest.approx(one[f"loss{beta}"], abs=1e-5)
    ref = _metrics(runs / "ref")
    for name in ("tp2", "dp2"):
        got = _metrics(runs / name)
        assert sorted(got) == sorted(ref)
        for step in ref:
            for n in ("loss", "kd loss", "lm loss"):
                assert got[step][n] == pytest.approx(ref[step][n], abs=1e-5), (name, step, n)


def test_on_policy_run_resumes_exactly(runs):
    ref, off, got = (_metrics(runs / n) for n in ("ref", "off", "cut"))
    assert sorted(_metrics(runs, "first.jsonl")) == [1, 2]
    assert sorted(ref) == [1, 2, 3]
    for step in ref:
        for n in ("loss", "kd loss", "lm loss"):
            assert got[step][n] == ref[step][n], (step, n)
    # Some micro-batches were the student's samples: the losses differ from the dataset's.
    assert any(abs(ref[s]["kd loss"] - off[s]["kd loss"]) > 1e-4 for s in ref)

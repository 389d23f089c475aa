"""The vocab-parallel logit divergence against a plain full-vocabulary torch computation
(autograd for the gradient): one process, chunked, and TP=2 over two gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemo_minitron.config import ConfigError
from nemo_minitron.distill.losses import (
    AUTO_CHUNK_BYTES,
    chunk_rows,
    hidden_state_loss,
    logit_divergence,
    logit_divergence_and_ce,
    token_cross_entropy,
)
from nemo_minitron.distill.objective import KDConfig
from tests.dist import spawn

KINDS = ["forward", "reverse", "js"]
N, V = 24, 64


def _inputs():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    w = torch.rand(N, generator=g, dtype=torch.float64)  # per-token upstream gradient
    return s, t, w


def reference(s, t, kind, temperature=1.0, top_k=None):
    """Textbook definitions on the full vocabulary."""
    t = t / temperature
    if top_k is not None:
        kth = t.topk(top_k, dim=-1).values[:, -1:]
        t = t.masked_fill(t < kth, float("-inf"))
    ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t, -1)
    ps, pt = ls.exp(), lt.exp()
    if kind == "forward":
        per = torch.where(pt > 0, pt * (lt - ls), torch.zeros_like(pt)).sum(-1)
    elif kind == "reverse":
        per = (ps * (ls - lt)).sum(-1)
    else:
        lm = (0.5 * (ps + pt)).log()
        per = 0.5 * (ps * (ls - lm)).sum(-1) + 0.5 * (pt * (lt - lm)).sum(-1)
    return per * temperature**2


def _value_and_grad(fn, s, t, w):
    s = s.clone().requires_grad_(True)
    per = fn(s, t)
    (per * w).sum().backward()
    return per.detach(), s.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_single_process_equals_reference_value_and_gradient(kind, temperature):
    s, t, w = _inputs()
    want = _value_and_grad(lambda a, b: reference(a, b, kind, temperature), s, t, w)
    for chunk in (None, 5, "auto"):  # chunked equals unchunked
        got = _value_and_grad(lambda a, b, c=chunk: logit_divergence(
            a, b, kind=kind, temperature=temperature, chunk_tokens=c), s, t, w)
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=0)


def test_top_k_teacher_and_zero_for_identical_models():
    s, t, w = _inputs()
    want = _value_and_grad(lambda a, b: reference(a, b, "forward", top_k=5), s, t, w)
    got = _value_and_grad(lambda a, b: logit_divergence(a, b, top_k=5), s, t, w)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=0)
    for kind in KINDS:
        same = logit_divergence(s, s.clone(), kind=kind)
        assert same.abs().max() < 1e-12
    with pytest.raises(ValueError, match="forward only"):
        logit_divergence(s, t, kind="reverse", top_k=5)


def test_token_cross_entropy_equals_torch_and_leaves_logits_alone():
    s, _, _ = _inputs()
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    before = s.clone()
    got = token_cross_entropy(s, labels, chunk_tokens=5)
    torch.testing.assert_close(got, F.cross_entropy(s, labels, reduction="none"))
    assert torch.equal(s, before)
    # The fused path (forward KL, T=1) gives the same divergence, gradient and cross-entropy.
    t, w = _inputs()[1:]
    want = _value_and_grad(lambda a, b: reference(a, b, "forward"), s, t, w)
    got = _value_and_grad(lambda a, b: logit_divergence_and_ce(a, b, labels, chunk_tokens=5)[0],
                          s, t, w)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=0)
    ce = logit_divergence_and_ce(s, t, labels, chunk_tokens=5)[1]
    torch.testing.assert_close(ce, F.cross_entropy(s, labels, reduction="none"))


@pytest.mark.parametrize("kind", KINDS)
def test_sequence_first_student_and_transposed_teacher(kind):
    """Logits in the layouts the objective hands over: the student's ``[s, b, V]`` as Megatron's
    output layer writes them, the teacher's ``[b, s, V]`` seen through a transposed view (its
    tokens cannot be flattened without a copy: chunks run along ``s``). Values, gradient and
    cross-entropy equal the reference on the same tokens."""
    s, t, w = _inputs()
    seq, b = 6, 4  # N = 24 tokens
    labels = torch.randint(0, V, (seq, b), generator=torch.Generator().manual_seed(5))
    teacher_bsv = t.view(seq, b, V).transpose(0, 1).contiguous()  # the teacher as returned
    teacher = teacher_bsv.transpose(0, 1)
    assert not teacher.is_contiguous()
    want = _value_and_grad(lambda a, b_: reference(a, b_, kind), s, t, w)
    for chunk in (None, 5, "auto"):
        def fn(a, _b, c=chunk):
            a = a.view(seq, b, V)
            if kind == "forward":
                return logit_divergence_and_ce(a, teacher, labels, chunk_tokens=c)[0]
            return logit_divergence(a, teacher, kind=kind, chunk_tokens=c)
        got = _value_and_grad(fn, s, t, w.view(seq, b))
        torch.testing.assert_close(got[0].reshape(-1), want[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=0)
    ce = logit_divergence_and_ce(s.view(seq, b, V), teacher, labels, chunk_tokens=5)[1]
    torch.testing.assert_close(ce, F.cross_entropy(s, labels.reshape(-1), reduction="none")
                               .view(seq, b))
    padded = torch.cat([s, torch.zeros(N, 3, dtype=s.dtype)], -1).view(seq, b, V + 3)
    got = token_cross_entropy(padded[..., :V], labels, chunk_tokens=5)  # vocabulary padding cut
    torch.testing.assert_close(got, ce)


def test_bf16_logits():
    """bf16 logits (the student's, under mixed precision): computed in fp32, the gradient
    returned in bf16, equal to the fp64 reference on the same rounded inputs."""
    s, t, w = _inputs()
    s16, t16 = s.to(torch.bfloat16), t.to(torch.bfloat16)
    want = _value_and_grad(lambda a, b: reference(a, b, "forward"), s16.double(), t16.double(), w)
    got = _value_and_grad(lambda a, b: logit_divergence(a, b, chunk_tokens=5), s16, t16, w)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1].double(), want[1], atol=1e-6, rtol=2**-8)


def test_no_grad_value_and_chunk_rows():
    """Under no_grad the fused path skips the gradient but gives the same value; the chunk size
    follows the vocabulary slice."""
    s, t, _ = _inputs()
    with torch.no_grad():
        got = logit_divergence(s.clone().requires_grad_(True), t)
    torch.testing.assert_close(got, reference(s, t, "forward"), atol=1e-6, rtol=0)
    cpu = torch.device("cpu")
    assert chunk_rows("auto", 10_000, 4096, cpu) == AUTO_CHUNK_BYTES["cpu"] // (4 * 4096)
    assert chunk_rows("auto", 10_000, 1 << 24, cpu) == 8  # never below 8 tokens
    assert chunk_rows("auto", 3, 64, cpu) == 3
    assert chunk_rows(None, 7, 64, cpu) == 7 and chunk_rows(5, 7, 64, cpu) == 5


@pytest.mark.parametrize("value", ["fast", 0, 2.5, True])
def test_kd_config_refuses_bad_chunk_tokens(value):
    with pytest.raises(ConfigError, match="kd.chunk_tokens"):
        KDConfig(chunk_tokens=value)
    KDConfig(chunk_tokens=None), KDConfig(chunk_tokens=64)


def test_hidden_state_losses():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(hidden_state_loss(a, b, "cosine"), 1 - cos)
    torch.testing.assert_close(hidden_state_loss(a, b, "mse"), ((a - b) ** 2).mean(-1))


TP_CASES = [("forward", None), ("reverse", None), ("js", None), ("forward", 6)]


def tp_job(out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    s, t, w = _inputs()
    half = slice(rank * V // 2, (rank + 1) * V // 2)  # this rank's vocabulary slice
    results = [_value_and_grad(lambda a, b, k=kind, top=top_k: logit_divergence(
        a, b, kind=k, temperature=1.5, top_k=top, chunk_tokens=7, group=dist.group.WORLD),
        s[:, half], t[:, half], w) for kind, top_k in TP_CASES]
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    results.append(token_cross_entropy(s[:, half], labels, chunk_tokens=7,
                                       group=dist.group.WORLD))
    torch.save(results, f"{out}.{rank}")


@pytest.mark.dist
def test_tp2_equals_full_vocabulary(tmp_path):
    spawn(tp_job, 2, str(tmp_path / "r"))
    s, t, w = _inputs()
    for i, (kind, top_k) in enumerate(TP_CASES):
        value, grad = _value_and_grad(lambda a, b, k=kind, top=top_k: reference(a, b, k, 1.5, top),
                                      s, t, w)
        for rank in range(2):
            got_value, got_grad = torch.load(tmp_path / f"r.{rank}")[i]
            torch.testing.assert_close(got_value, value, atol=1e-6, rtol=0, msg=kind)
            torch.testing.assert_close(got_grad, grad[:, rank * V // 2:(rank + 1) * V // 2],
                                       atol=1e-6, rtol=0, msg=kind)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"r.{rank}")[-1],
                                   F.cross_entropy(s, labels, reduction="none"))

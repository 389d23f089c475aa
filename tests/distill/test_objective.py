"""One distillation step through Megatron's schedule (``KDObjective``) against a torch-only
recomputation: the teacher's and the student's logits as the models return them, the masked
mean of ``F.kl_div`` plus a weighted cross-entropy, differentiated by autograd. The student is
our ``MinitronGPTModel`` (the loss reads its sequence-first logits) and Megatron's stock
``GPTModel`` (the loss reads its returned ``[b, s, v]`` logits); at TP=1 and TP=2."""

from __future__ import annotations

import pytest
import torch

from tests.dist import spawn
from tests.helpers.distill import STUDENT, TEACHER, _batches, _full, _stock_student

TOL = dict(atol=1e-5, rtol=1e-5)


def objective_job(tp: int) -> None:
    import torch.nn.functional as F
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.distill.objective import KDConfig, KDObjective
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    rt = init_distributed(ParallelConfig(tensor_model_parallel_size=tp), seed=3)
    teacher = build_model(ModelConfig(**TEACHER))
    ours = build_model(ModelConfig(**STUDENT))
    stock = _stock_student(ModelConfig(**STUDENT))
    stock.load_state_dict(ours.state_dict(), strict=True)
    assert type(ours).__name__ == "MinitronGPTModel" and type(stock).__name__ == "GPTModel"

    mbs, n_micro, s = 2, 2, TEACHER["seq_length"]
    batches = _batches(mbs, n_micro, s)
    cfg = KDConfig(lm_loss_weight=0.5)

    # Reference: full-vocabulary logits as the models return them, torch's KL and CE.
    with torch.no_grad():
        t_logits = [_full(teacher(b["tokens"], b["position_ids"], None)).float() for b in batches]
    stock.zero_grad(set_to_none=True)
    want_losses = []
    for b, zt in zip(batches, t_logits):
        zs = _full(stock(b["tokens"], b["position_ids"], None)).float()
        kl = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True,
                      reduction="none").sum(-1)
        ce = F.cross_entropy(zs.transpose(1, 2), b["labels"], reduction="none")
        m = b["loss_mask"]
        loss = ((kl * m).sum() + 0.5 * (ce * m).sum()) / m.sum()
        (loss / n_micro).backward()
        want_losses.append(loss.detach())
    want_grads = {n: p.grad.clone() for n, p in stock.named_parameters()}

    for name, student in (("ours", ours), ("stock", stock)):
        student.zero_grad(set_to_none=True)
        kd = KDObjective(teacher, student, cfg, rt.device, pairs=[], num_microbatches=n_micro)
        out = get_forward_backward_func()(
            forward_step_func=kd.forward_step, data_iterator=iter(batches), model=[student],
            num_microbatches=n_micro, seq_length=s, micro_batch_size=mbs, forward_only=False)
        got = torch.stack([o["loss"] for o in out])
        torch.testing.assert_close(got, torch.stack(want_losses), **TOL,
                                   msg=lambda m, n=name: f"{n} loss: {m}")
        for n, p in student.named_parameters():
            torch.testing.assert_close(p.grad, want_grads[n], **TOL,
                                       msg=lambda m, s=name, n=n: f"{s} {n}: {m}")


def test_kd_step_equals_torch_reference_tp1():
    spawn(objective_job, 1, 1)


@pytest.mark.dist
def test_kd_step_equals_torch_reference_tp2():
    spawn(objective_job, 2, 2)

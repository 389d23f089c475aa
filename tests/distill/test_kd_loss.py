"""``nm.KDLoss`` in a user's own Megatron loop against the ``distill`` verb's path.

The user's side: a stock megatron-core ``GPTModel`` student, a plain generator of batches and a
``forward_step_func`` that takes the batch itself and returns ``kd(batch, model)``, run by
``get_forward_backward_func()``. The verb's side: ``KDObjective`` built as ``distill_models``
builds it (``add_projections`` + ``layer_pairs``) around a ``MinitronGPTModel`` with the same
weights, its ``forward_step`` handed to the schedule as ``train.loop.Trainer`` does. Every
loss term (logit KL at T=2 in chunks, cross-entropy, hidden and embedding losses through
learned projections) and every gradient must agree (1e-6), at TP=2, at PP=2 (where the first
stage's intermediate loss enters through the backward pass) and at both together. At TP=2 the
logit KL and cross-entropy also equal torch's on the gathered full-vocabulary logits (1e-5)."""

from __future__ import annotations

import pytest
import torch

from tests.dist import spawn
from tests.helpers.distill import (
    STUDENT,
    TEACHER,
    _batches,
    _full,
    _stock_student,
)

TOL = dict(atol=1e-6, rtol=1e-6)
REF_TOL = dict(atol=1e-5, rtol=1e-5)  # another order of summation than the chunked loss


def kd_loss_job(tp: int, pp: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import nemo_minitron as nm
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.distill.objective import KDObjective, add_projections
    from nemo_minitron.distill.stage import layer_pairs
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    rt = init_distributed(ParallelConfig(tensor_model_parallel_size=tp,
                                         pipeline_model_parallel_size=pp), seed=3)
    teacher = build_model(ModelConfig(**TEACHER))
    verbs = build_model(ModelConfig(**STUDENT))
    users = _stock_student(ModelConfig(**STUDENT))
    users.load_state_dict(verbs.state_dict(), strict=True)
    assert type(verbs).__name__ == "MinitronGPTModel" and type(users).__name__ == "GPTModel"

    mbs, n_micro, s, seed = 2, 2, TEACHER["seq_length"], 7
    batches = _batches(mbs, n_micro, s)
    cfg = nm.KDConfig(temperature=2.0, chunk_tokens=5, lm_loss_weight=0.5, hidden_weight=1.0,
                      embedding_weight=0.5)
    schedule = dict(num_microbatches=n_micro, seq_length=s, micro_batch_size=mbs,
                    forward_only=False)

    # The verb's path (distill_models' objective, the Trainer's schedule call).
    pairs = layer_pairs(None, STUDENT["num_layers"], TEACHER["num_layers"], cfg.layer_map)
    add_projections(verbs, TEACHER["hidden_size"], pairs, True, seed)
    obj = KDObjective(teacher, verbs, cfg, rt.device, pairs=pairs, num_microbatches=n_micro)
    extra = {"adjust_tensor_shapes_fn": obj.adjust_tensor_shapes} if pp > 1 else {}
    want = get_forward_backward_func()(forward_step_func=obj.forward_step,
                                       data_iterator=iter(batches), model=[verbs],
                                       **schedule, **extra)
    want_stage = obj.pop_stage_metrics()

    # The user's loop: KDLoss from inside their own forward_step_func.
    kd = nm.KDLoss(users, teacher, cfg, num_microbatches=n_micro, seed=seed)

    def forward_step_func(data_iterator, model):
        batch = next(data_iterator)
        return kd(batch, model)

    extra = {"adjust_tensor_shapes_fn": kd.adjust_tensor_shapes} if pp > 1 else {}
    got = get_forward_backward_func()(forward_step_func=forward_step_func,
                                      data_iterator=(b for b in batches), model=[users],
                                      **schedule, **extra)

    got_stage = kd.pop_stage_metrics()
    assert got_stage.keys() == want_stage.keys()
    for name, value in got_stage.items():
        assert abs(value - want_stage[name]) <= 1e-6, name
    if ps.is_pipeline_last_stage():
        assert len(got) == n_micro and set(got[0]) == {
            "loss", "kd loss", "lm loss", "hidden loss", "embedding loss"}
        for name in got[0]:
            torch.testing.assert_close(torch.stack([o[name] for o in got]),
                                       torch.stack([o[name] for o in want]), **TOL,
                                       msg=lambda m, n=name: f"{n}: {m}")
    else:
        assert got == [] and want_stage  # the first stage's intermediate losses
    if pp == 1:  # and the logit terms against torch on the full-vocabulary logits (T=2)
        import torch.nn.functional as F

        with torch.no_grad():
            for b, o in zip(batches, got):
                zs, zt = (_full(m(b["tokens"], b["position_ids"], None)).float() / 2.0
                          for m in (users, teacher))
                kl = 4.0 * F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1),
                                    log_target=True, reduction="none").sum(-1)
                ce = F.cross_entropy(zs.transpose(1, 2) * 2.0, b["labels"], reduction="none")
                m = b["loss_mask"]
                torch.testing.assert_close(o["kd loss"], (kl * m).sum() / m.sum(), **REF_TOL)
                torch.testing.assert_close(o["lm loss"], (ce * m).sum() / m.sum(), **REF_TOL)
    grads = dict(users.named_parameters())
    assert grads.keys() == dict(verbs.named_parameters()).keys()
    assert any(n.startswith("kd_projections.") for n in grads)
    for n, p in verbs.named_parameters():
        assert p.grad is not None and grads[n].grad is not None, n
        torch.testing.assert_close(grads[n].grad, p.grad, **TOL, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.dist
def test_kd_loss_in_user_loop_equals_distill_path_tp2():
    spawn(kd_loss_job, 2, 2, 1)


@pytest.mark.dist
def test_kd_loss_in_user_loop_equals_distill_path_pp2():
    spawn(kd_loss_job, 2, 1, 2)


@pytest.mark.dist
def test_kd_loss_in_user_loop_equals_distill_path_tp2_pp2():
    """TP and PP together (4 gloo processes): tensor-parallel stages of a pipeline."""
    spawn(kd_loss_job, 4, 2, 2)

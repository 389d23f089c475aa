"""``distill`` on instruction data (``instruct.data``): the loss against a torch-only
recomputation whose response positions come from the rendered prompt's length (not the
dataset's mask) and whose packed attention is built here, prompt positions of exactly zero
weight (the teacher's and the student's logits and the labels there perturbed: loss and
gradients bit-identical; perturbed at response positions: both change), TP=2 and PP=2 against
one process, exact resume, the shipped recipe, and bad input.

Spawned jobs: one process (the checks, the reference run, the interrupted run, its resume), two
processes (TP=2, then PP=2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli import cli
from tests.dist import in_order, spawn
from tests.helpers.data import _examples
from tests.helpers.distill import _metrics, summary_job
from tests.helpers.train import _copy_metrics

KD = ["train.micro_batch_size=2", "train.global_batch_size=4", "train.train_iters=3",
      "train.lr=1e-3", "train.lr_warmup_iters=0", "train.eval_interval=2", "train.eval_iters=1",
      "train.log_interval=1", "train.tensorboard=false", "instruct.pack=true",
      "instruct.valid_fraction=0.25", "data.seed=7", "kd.lm_loss_weight=0.5",
      "kd.teacher_max_loss_ratio=1.5"]  # the session teacher: 20 steps, not on instructions
NAMES = ["loss", "kd loss", "lm loss"]


def _data_overrides(tiny: list[str]) -> list[str]:
    return [o for o in tiny if o.startswith("data.")]


def distill_job(out: str, teacher: str, student: str, overrides: list[str]) -> None:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.distill.stage import DistillRecipe, distill

    distill(load_recipe(None, overrides, cls=DistillRecipe), teacher, student, out)


def _reference(teacher, student, batch, prompt_lens, lm_w):
    """Masked mean of forward KL + ``lm_w`` x CE over the response positions found from each
    example's prompt length, on the models' full logits; attention per example (``segs``)."""
    import torch
    import torch.nn.functional as F

    tokens, pos, seg = batch["tokens"], batch["position_ids"], batch.get("segment_ids")
    mask = None
    if seg is not None:  # True = masked: another example, or the future
        s = tokens.shape[1]
        allowed = (seg[:, :, None] == seg[:, None, :]) & torch.ones(s, s).tril().bool()
        mask = ~allowed.unsqueeze(1)
    with torch.no_grad():
        zt = teacher(tokens, pos, mask).float()
    zs = student(tokens, pos, mask).float()
    kl = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True,
                  reduction="none").sum(-1)
    ce = F.cross_entropy(zs.transpose(1, 2), batch["labels"], reduction="none")
    resp = torch.zeros_like(kl)
    for row, spans in enumerate(prompt_lens):
        for start, p, r in spans:  # example at ``start``: p prompt, r response tokens
            resp[row, start + p - 1:start + p - 1 + r] = 1  # label j is token j + 1
    return ((kl + lm_w * ce) * resp).sum() / resp.sum(), resp


def _checks(teacher_ckpt: str, student_ckpt: str, data: str, out: str) -> None:
    import torch

    from nemo_minitron.checkpoint.io import (
        load_checkpoint_tokenizer,
        load_model,
        load_model_config,
    )
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.data.instruct import build_sft_dataset, read_jsonl, render_example
    from nemo_minitron.distill.objective import KDConfig, KDObjective
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig())
    tok = load_checkpoint_tokenizer(student_ckpt)
    teacher, student = (load_model(c)[0] for c in (teacher_ckpt, student_ckpt))
    seq = load_model_config(student_ckpt).seq_length
    exs = read_jsonl(data)[:8]
    lens = [(len(tok.encode(p)), len(tok.encode(r)) + 1)
            for p, r in (render_example(tok, e) for e in exs)]
    kd = KDObjective(teacher, student, KDConfig(lm_loss_weight=0.5), torch.device("cpu"),
                     pairs=[])
    res: dict[str, float] = {}

    def run(batch, hooks=()):
        handles = [mod.output_layer.register_forward_hook(h) for mod, h in hooks]
        student.zero_grad(set_to_none=True)
        out, loss_func = kd.step(batch, student)
        loss = loss_func(out)[0]
        loss.backward()
        for h in handles:
            h.remove()
        return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}

    def shift_at(where):  # adds 3.0 to the logits (Megatron's [s, b, v]) where ``where [b, s]``
        def hook(_m, _args, out):
            return out[0] + 3.0 * torch.randn_like(out[0]) * where.t()[..., None], out[1]
        return hook

    for pack in (False, True):
        ds = build_sft_dataset(exs, tok, seq, pack=pack)
        idx = [0, 1]
        batch = {k: torch.stack([ds[i][k] for i in idx]) for k in ds[0]}
        spans = []
        for w in idx:
            start, row = 0, []
            for i in ds.windows.examples[w]:
                row.append((start, *lens[i]))
                start += lens[i][0] + lens[i][1]
            spans.append(row)
        student.zero_grad(set_to_none=True)
        want, resp = _reference(teacher, student, batch, spans, 0.5)
        want.backward()
        want_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        got, grads = run(batch)
        name = "packed" if pack else "padded"
        res[f"{name}_loss_diff"] = float((got - want).abs())
        res[f"{name}_grad_diff"] = max(float((grads[n] - want_grads[n]).abs().max())
                                       for n in grads)
        res[f"{name}_mask_is_responses"] = bool(torch.equal(batch["loss_mask"], resp))
        prompt = resp == 0
        # Prompt positions: new labels, teacher logits and student logits there.
        changed = dict(batch, labels=torch.where(prompt, (batch["labels"] + 17) % tok.vocab_size,
                                                 batch["labels"]))
        torch.manual_seed(0)
        got2, grads2 = run(changed, [(teacher, shift_at(prompt)), (student, shift_at(prompt))])
        res[f"{name}_prompt_perturbed_equal"] = bool(torch.equal(got, got2)) and all(
            torch.equal(grads[n], grads2[n]) for n in grads)
        # The same perturbation at response positions changes the loss and the gradient.
        got3, grads3 = run(batch, [(teacher, shift_at(~prompt)), (student, shift_at(~prompt))])
        res[f"{name}_response_perturbed_change"] = float((got3 - got).abs())
        res[f"{name}_response_grad_change"] = max(float((grads3[n] - grads[n]).abs().max())
                                                  for n in grads)
    Path(out).write_text(json.dumps(res))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pair, tiny_overrides) -> Path:
    teacher, student = pair
    root = tmp_path_factory.mktemp("instruct-kd")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in _examples()))
    kd = _data_overrides(tiny_overrides) + KD + [f"instruct.data={data}"]
    spawn(in_order, 1, [
        (_checks, (teacher, student, str(data), str(root / "checks.json"))),
        (distill_job, (str(root / "ref"), teacher, student, kd)),
        (distill_job, (str(root / "cut"), teacher, student, kd + ["train.exit_interval=2"])),
        (_copy_metrics, (str(root / "cut"), str(root / "first.jsonl"))),
        (distill_job, (str(root / "cut"), teacher, student, kd)),
        (summary_job, (str(root / "self"), teacher, teacher, kd + SELF))])
    return root


SELF = ["train.train_iters=1", "train.eval_interval=1"]  # the teacher into itself


def _teacher_loss_is_the_loops(run: Path) -> None:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step0 = next(r for r in rows if r["kind"] == "valid" and r["step"] == 0)
    got = json.loads((run / "summary.json").read_text())["teacher"]
    assert got == pytest.approx(step0["lm loss"], abs=1e-5)  # response tokens only


def test_loss_equals_torch_recomputation_on_response_tokens(runs):
    c = json.loads((runs / "checks.json").read_text())
    for name in ("padded", "packed"):
        assert c[f"{name}_mask_is_responses"], name
        assert c[f"{name}_loss_diff"] < 1e-5, (name, c)
        assert c[f"{name}_grad_diff"] < 1e-5, (name, c)


def test_prompt_positions_contribute_exactly_zero(runs):
    c = json.loads((runs / "checks.json").read_text())
    for name in ("padded", "packed"):
        assert c[f"{name}_prompt_perturbed_equal"], name  # loss and every gradient, bit for bit
        assert c[f"{name}_response_perturbed_change"] > 1e-3, (name, c)  # the test can fail
        assert c[f"{name}_response_grad_change"] > 1e-6, (name, c)


def test_teacher_loss_is_the_loops_response_loss(runs):
    _teacher_loss_is_the_loops(runs / "self")


def test_interrupted_run_resumes_exactly(runs):
    assert sorted(_metrics(runs, "first.jsonl")) == [1, 2]
    ref, got = _metrics(runs / "ref"), _metrics(runs / "cut")
    assert sorted(ref) == [1, 2, 3] and ref[3]["kd loss"] < ref[1]["kd loss"]
    for step in ref:
        for n in NAMES:
            assert got[step][n] == ref[step][n], (step, n)


@pytest.mark.dist
def test_tp2_and_pp2_reproduce_one_process(runs, pair, tiny_overrides):
    teacher, student = pair
    kd = _data_overrides(tiny_overrides) + KD + [f"instruct.data={runs / 'data.jsonl'}"]
    layouts = {"tp2": ["parallel.tensor_model_parallel_size=2"],
               "pp2": ["parallel.pipeline_model_parallel_size=2"]}
    spawn(in_order, 2, [(distill_job, (str(runs / n), teacher, student, kd + extra))
                        for n, extra in layouts.items()] + [
        (summary_job, (str(runs / "self-pp2"), teacher, teacher, kd + SELF + layouts["pp2"]))])
    _teacher_loss_is_the_loops(runs / "self-pp2")
    ref = _metrics(runs / "ref")
    for name in layouts:
        got = _metrics(runs / name)
        assert sorted(got) == sorted(ref)
        for step in ref:
            for n in NAMES:
                assert got[step][n] == pytest.approx(ref[step][n], abs=1e-5), (name, step, n)


def test_shipped_recipe_runs(tmp_path, tiny_overrides):
    """``recipes/tiny_cpu_distill_instruct.yaml`` as shipped (the embedded instruction set),
    shortened to one step on the session's small corpus; a one-step 256-token model (the demo's
    window; the embedded set's shortest examples are about 100 tokens) distilled into itself."""
    from tests.helpers.train import pretrain_job

    spawn(pretrain_job, 1, str(tmp_path / "m"), tiny_overrides + [
        "model.seq_length=256", "train.train_iters=1", "train.eval_interval=0"])
    ckpt = str(tmp_path / "m" / "checkpoints" / "step_0000001")
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu_distill_instruct.yaml"
    out = tmp_path / "run"
    res = cli("distill", "--teacher", ckpt, "--student", ckpt, str(recipe),
              "--out", str(out), *_data_overrides(tiny_overrides), "train.train_iters=1",
              "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_iters=1",
              "train.lr_warmup_iters=0", "instruct.embedded_max_chars=300",
              "kd.teacher_max_loss_ratio=2.0")  # one step of pretraining: untrained
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1]
    assert [r["step"] for r in rows if r["kind"] == "valid"] == [0, 1]
    assert (out / "checkpoints" / "step_0000001").is_dir()

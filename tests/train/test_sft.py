"""``sft``: response-only loss masking against an independent recomputation from the model's
logits, packing against unpacked examples, TP=2 x PP=2 against one process, exact resume, and
the verb's bad-input errors.

Three spawned jobs for the module: one process (base checkpoint, masking/packing checks, the
reference run and the interrupted run), one process (the resumed run), four processes
(TP=2 x PP=2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nemo_minitron.cli import main
from tests.dist import spawn
from tests.helpers.data import _examples

SFT = ["train.micro_batch_size=4", "train.global_batch_size=8", "train.train_iters=3",
       "train.lr=1e-3", "train.min_lr=1e-4", "train.lr_warmup_iters=0", "train.eval_interval=2",
       "train.eval_iters=1", "train.log_interval=1", "train.tensorboard=false",
       "sft.pack=true", "sft.valid_fraction=0.25", "data.seed=7"]



def _metrics(run: Path, kind: str) -> dict[int, float] | list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    if kind == "train":
        return {r["step"]: r["sft loss"] for r in rows if r["kind"] == "train"}
    return [r["sft loss"] for r in rows if r["kind"] == "valid"]


def _sft_job(ckpt: str, data: str, out: str, overrides: list[str]) -> None:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.train.sft import SFTRecipe, sft

    sft(load_recipe(None, overrides, cls=SFTRecipe), ckpt, data, out)


def _loss_checks(ckpt: str, data: str) -> dict[str, float]:
    """Masking and packing on the real model (TP=PP=1); every figure against a recomputation
    that does not use the dataset's loss mask."""
    import torch
    import torch.nn.functional as F

    from nemo_minitron.checkpoint.io import (
        load_checkpoint_tokenizer,
        load_model_config,
        load_weights,
    )
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.data.instruct import build_sft_dataset, read_jsonl, render_example
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.train.objectives import SFTObjective

    init_distributed(ParallelConfig())
    cfg, tok = load_model_config(ckpt), load_checkpoint_tokenizer(ckpt)
    model = build_model(cfg)
    load_weights(ckpt, model)
    model.eval()
    exs = read_jsonl(data)[:12]
    obj = SFTObjective(torch.device("cpu"))
    out: dict[str, float] = {}

    def batch_of(ds, idx):
        return {k: torch.stack([ds[i][k] for i in idx]) for k in ds[0]}

    def objective_loss(batch) -> float:
        output, loss_func = obj.forward_step(iter([batch]), model)
        return float(loss_func(output)[0])

    with torch.no_grad():
        # 1. Masking: the objective's loss on 4 padded examples equals cross-entropy of the
        # model's logits averaged over the response tokens found from the rendered prompt length.
        padded = build_sft_dataset(exs, tok, cfg.seq_length, pack=False)
        batch = batch_of(padded, range(4))
        logits = model(batch["tokens"], batch["position_ids"], None).float()
        ce = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
        total, count = 0.0, 0
        for row, ex in enumerate(exs[:4]):
            prompt, response = render_example(tok, ex)
            p = len(tok.encode(prompt))
            r = len(tok.encode(response)) + 1  # + eod
            total += float(ce[row, p - 1:p - 1 + r].sum())  # label j is token j + 1
            count += r
        out["masked_loss"] = objective_loss(batch)
        out["reference_loss"] = total / count
        # 2. Prompt positions contribute exactly zero: new targets there change their own
        # per-token loss but not the SFT loss.
        changed = dict(batch)
        prompt_pos = batch["loss_mask"] == 0
        changed["labels"] = torch.where(prompt_pos, (batch["labels"] + 17) % tok.vocab_size,
                                        batch["labels"])
        out["prompt_changed_loss"] = objective_loss(changed)
        per_tok = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        per_tok2 = model(batch["tokens"], batch["position_ids"], None, labels=changed["labels"])
        out["prompt_token_loss_change"] = float((per_tok2 - per_tok)[prompt_pos].abs().max())
        response_changed = dict(batch)
        response_changed["labels"] = torch.where(~prompt_pos, (batch["labels"] + 17) %
                                                 tok.vocab_size, batch["labels"])
        out["response_changed_loss"] = objective_loss(response_changed)

        # 3. Packing: every example's mean response loss in packed windows (block-diagonal
        # attention, restarted positions) equals its loss alone in a padded window.
        def per_example(ds, use_mask: bool) -> dict[int, float]:
            res = {}
            for w, group in enumerate(ds.windows.examples):
                b = batch_of(ds, [w])
                seg = b.get("segment_ids")
                mask = None
                if use_mask and seg is not None:
                    from nemo_minitron.data.instruct import sft_attention_mask

                    mask = sft_attention_mask(seg)
                loss = model(b["tokens"], b["position_ids"], mask, labels=b["labels"])[0]
                seg_row = seg[0] if seg is not None else torch.zeros_like(b["tokens"][0])
                for s, i in enumerate(group):
                    sel = (seg_row == s) & (b["loss_mask"][0] > 0)
                    res[i] = float(loss[sel].mean())
            return res

        packed = build_sft_dataset(exs, tok, cfg.seq_length, pack=True)
        alone = per_example(padded, True)
        together = per_example(packed, True)
        leaky = per_example(packed, False)
        out["windows_packed"] = len(packed)
        out["windows_padded"] = len(padded)
        out["packing_max_diff"] = max(abs(alone[i] - together[i]) for i in alone)
        out["no_mask_max_diff"] = max(abs(alone[i] - leaky[i]) for i in alone)
        out["examples_compared"] = len(alone)
    return out


def _first_job(tiny: list[str], root: str, data: str) -> None:
    """Base checkpoint, loss checks, the reference run and the interrupted run."""
    from nemo_minitron.config import load_recipe
    from nemo_minitron.train.pretrain import pretrain

    pretrain(load_recipe(None, tiny + ["train.train_iters=2", "train.eval_interval=0"]),
             f"{root}/base")
    ckpt = f"{root}/base/checkpoints/step_0000002"
    Path(f"{root}/checks.json").write_text(json.dumps(_loss_checks(ckpt, data)))
    _sft_job(ckpt, data, f"{root}/ref", SFT)
    _sft_job(ckpt, data, f"{root}/cut", SFT + ["train.exit_interval=2"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_overrides) -> Path:
    root = tmp_path_factory.mktemp("sft")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in _examples()))
    spawn(_first_job, 1, tiny_overrides, str(root), str(data))
    return root


def test_loss_is_on_response_tokens_only(runs):
    c = json.loads((runs / "checks.json").read_text())
    assert c["masked_loss"] == pytest.approx(c["reference_loss"], abs=1e-5)
    assert c["prompt_changed_loss"] == c["masked_loss"]  # exactly: prompt positions weigh 0
    assert c["prompt_token_loss_change"] > 1e-3  # ...although their own losses changed
    assert abs(c["response_changed_loss"] - c["masked_loss"]) > 1e-3


def test_packing_matches_unpacked_examples(runs):
    c = json.loads((runs / "checks.json").read_text())
    assert c["examples_compared"] == 12 and c["windows_packed"] < c["windows_padded"]
    assert c["packing_max_diff"] < 1e-5
    # Without the block-diagonal mask the packed examples see each other: the mask matters.
    assert c["no_mask_max_diff"] > 1e-3


def test_interrupted_sft_resumes_exactly(runs):
    ckpt = str(runs / "base" / "checkpoints" / "step_0000002")
    cut = runs / "cut"
    assert _metrics(cut, "train").keys() == {1, 2}
    spawn(_sft_job, 1, ckpt, str(runs / "data.jsonl"), str(cut),
          SFT + ["train.exit_interval=2"])
    full = _metrics(runs / "ref", "train")
    assert full.keys() == {1, 2, 3}
    assert _metrics(cut, "train") == full  # bit-exact on CPU
    assert _metrics(cut, "valid") == _metrics(runs / "ref", "valid")
    assert len(_metrics(cut, "valid")) == 3  # steps 0, 2, 3


@pytest.mark.dist
def test_tp2_pp2_reproduces_one_process(runs):
    ckpt = str(runs / "base" / "checkpoints" / "step_0000002")
    spawn(_sft_job, 4, ckpt, str(runs / "data.jsonl"), str(runs / "tp2pp2"),
          SFT + ["parallel.tensor_model_parallel_size=2",
                 "parallel.pipeline_model_parallel_size=2"])
    ref, got = _metrics(runs / "ref", "train"), _metrics(runs / "tp2pp2", "train")
    assert ref.keys() == got.keys() == {1, 2, 3}
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5)
    assert _metrics(runs / "tp2pp2", "valid") == pytest.approx(_metrics(runs / "ref", "valid"),
                                                               abs=1e-5)
    assert ref[3] < ref[1]  # it learns


def _bad(tmp_path: Path, name: str, lines: list[str]) -> str:
    p = tmp_path / name
    p.write_text("".join(x + "\n" for x in lines))
    return str(p)


def test_bad_input_is_one_line_error(runs, tmp_path, capsys):
    ckpt = str(runs / "base" / "checkpoints" / "step_0000002")
    good = json.dumps({"instruction": "Add 1 and 2.", "output": "3"})
    cases = [
        ([_bad(tmp_path, "a.jsonl", [good, good, "{oops"])], r"a\.jsonl:3: not JSON"),
        ([_bad(tmp_path, "b.jsonl", ["", ""])], "the data set is empty"),
        ([_bad(tmp_path, "c.jsonl", [json.dumps({"instruction": "x", "output": "y " * 300})]
               * 4), "sft.valid_fraction=0.5"], "every example is longer than model.seq_length"),
        ([str(runs / "data.jsonl"), "sft.chat_template=/no/such.jinja"],
         "sft.chat_template='/no/such.jinja' does not exist"),
        ([str(runs / "data.jsonl"), "sft.valid_fraction=0"], "no validation examples"),
        ([str(tmp_path / "missing.jsonl")], "does not exist"),
    ]
    for args, pattern in cases:
        out = tmp_path / "out"
        rc = main(["sft", ckpt, *args, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, (args, err)
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert re.search(pattern, err[0]), (pattern, err[0])
        assert not out.exists()


def test_empty_responses_are_counted_in_one_warning(tmp_path, embedded_paths):
    from nemo_minitron.config import load_recipe
    from nemo_minitron.data.tokenizer import load_tokenizer
    from nemo_minitron.train.sft import SFTRecipe, sft_splits
    from tests.helpers.data import kept_records

    rows = [{"instruction": f"Add {i} and 1.", "output": "" if i % 3 == 0 else str(i + 1)}
            for i in range(6)]
    rows[1] = {"messages": [{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "  \n"}]}
    data = _bad(tmp_path, "d.jsonl", [json.dumps(r) for r in rows])
    recipe = load_recipe(None, ["train.eval_interval=0", "sft.valid_fraction=0"],
                         cls=SFTRecipe)
    with kept_records("nemo_minitron.sft") as records:
        splits = sft_splits(recipe, data, load_tokenizer(embedded_paths[1]), 64)
    assert [r.getMessage() for r in records] == [
        f"{data}: 3 of 6 examples have an empty response (they teach the end-of-sequence "
        "token alone)"]
    # They are still trained on (the user's data, as given), on the end-of-sequence token.
    assert len(splits.train) == 6
    losses = sorted(int(splits.train[i]["loss_mask"].sum()) for i in range(6))
    assert losses[:2] == [1, 1] and min(losses[2:]) > 1  # whitespace is a response token

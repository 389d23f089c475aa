"""The lm-eval adapter scores a local multiple-choice task, rolling log-likelihoods and
generate_until exactly as lm-eval's own Hugging Face model (``HFLM``) does on the exported
weights (1e-4), offline."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from tests.dist import spawn
from tests.interop.hfmodels import WORDS, save_hf_model

pytest.importorskip("lm_eval")

TASK = "nm_tiny_mc"
ROLLING = " ".join(f"w{i % 140 + 3}" for i in range(150))  # longer than max_length: 3 windows
GEN = [("w5 w6 w7", {"until": ["w9"], "max_gen_toks": 8, "do_sample": False})]


def _write_task(root: Path) -> None:
    rng = random.Random(0)
    with open(root / "mc.jsonl", "w") as f:
        for _ in range(6):
            q = " ".join(f"w{rng.randrange(WORDS - 3)}" for _ in range(rng.randrange(3, 9)))
            choices = [" ".join(f"w{rng.randrange(WORDS - 3)}" for _ in range(rng.randrange(1, 4)))
                       for _ in range(3)]
            f.write(json.dumps({"question": q, "choices": choices, "label": 1}) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: question\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")


def _run(lm, root: Path) -> dict:
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], log_samples=True,
                                  task_manager=TaskManager(include_path=str(root / "tasks")))
    samples = out["samples"][TASK]
    lls = [[r[0][0] for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (ROLLING,), 0)])
    gen = lm.generate_until([Instance("generate_until", {}, g, i) for i, g in enumerate(GEN)])
    return {"lls": lls, "acc": out["results"][TASK]["acc,none"], "rolling": rolling,
            "gen": gen}


def adapter_job(root: str) -> None:
    from nemo_minitron.eval.lm_eval_adapter import MinitronLM
    from nemo_minitron.interop.hf_export import export_hf
    from nemo_minitron.interop.hf_import import import_hf

    r = Path(root)
    import_hf(r / "hf", r / "ck")
    export_hf(r / "ck", r / "exported")
    (r / "ours.json").write_text(json.dumps(_run(MinitronLM(str(r / "ck"), batch_size=4), r)))


def test_adapter_equals_hflm(tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    save_hf_model(tmp_path / "hf", "llama", seed=9)
    _write_task(tmp_path)
    spawn(adapter_job, 1, str(tmp_path))
    ours = json.loads((tmp_path / "ours.json").read_text())
    hflm = HFLM(pretrained=str(tmp_path / "exported"), device="cpu", dtype="float32",
                batch_size=4)
    ref = _run(hflm, tmp_path)
    assert len(ours["lls"]) == 6 and all(len(x) == 3 for x in ours["lls"])
    torch.testing.assert_close(torch.tensor(ours["lls"]), torch.tensor(ref["lls"]), atol=1e-4,
                               rtol=0)
    assert ours["acc"] == ref["acc"]
    assert ours["rolling"][0] == pytest.approx(ref["rolling"][0], abs=1e-4)
    assert ours["gen"] == ref["gen"] and len(ours["gen"][0].split()) == 8, ours["gen"]
    assert os.path.isdir(tmp_path / "exported")

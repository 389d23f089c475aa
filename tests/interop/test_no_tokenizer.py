"""A Hugging Face directory without tokenizer files, through the verbs a user runs on it:
``import-hf`` (weights only), ``prune`` (calibrated on data tokenized elsewhere), ``merge`` and
``export-hf`` (weights and config, with a warning). transformers loads every export: the
unpruned one gives the source model's logits, the pruned and merged ones our models' logits.
The verbs that need a tokenizer refuse in one line (``tests/test_bad_inputs.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.cli import run_cli
from tests.dist import spawn
from tests.interop.hfmodels import WORDS, hf_logits, save_hf_model, save_tokenizer, tokens

ATOL = 1e-4
PRUNE = ["target.ffn_hidden_size=96", "target.num_attention_heads=2", "importance=magnitude",
         "target.hardware_multiple=1", "calib.seq_length=16", "calib.num_samples=8",
         "calib.eval_samples=8", "calib.micro_batch_size=4"]


def logits_job(root: str) -> None:
    from nemo_minitron.checkpoint.io import load_model
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.forward import forward_logits

    for name in ("pruned_a", "merged"):
        model, _, tok = load_model(Path(root) / name, ParallelConfig())
        assert tok is None
        torch.save(forward_logits(model, tokens()), Path(root) / f"ours_{name}.pt")


def _ok(*args: str) -> str:
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    from nemo_minitron.data.indexed import write_indexed_dataset
    from nemo_minitron.data.tokenizer import load_tokenizer

    r = tmp_path_factory.mktemp("notok")
    for name, seed in (("a", 0), ("b", 1)):
        save_hf_model(r / f"hf_{name}", "llama", seed=seed, tokenizer=False)
    # Calibration data tokenized with a tokenizer kept outside the checkpoints.
    save_tokenizer(r / "tok")
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(f"w{int(i)}" for i in torch.randint(0, WORDS - 3, (40,), generator=g))
            for _ in range(60)]
    write_indexed_dataset(docs, load_tokenizer(r / "tok"), r / "corpus", progress=False)
    data = [f"data.path={r / 'corpus'}", f"data.tokenizer={r / 'tok'}"]
    logs = {}
    for name in ("a", "b"):
        logs[f"import_{name}"] = _ok("import-hf", str(r / f"hf_{name}"), str(r / f"ck_{name}"))
        _ok("prune", str(r / f"ck_{name}"), str(r / f"pruned_{name}"), *PRUNE, *data)
    _ok("merge", "--base", str(r / "pruned_a"), "--other", str(r / "pruned_b"), "--out",
        str(r / "merged"))
    for name in ("ck_a", "pruned_a", "merged"):
        logs[f"export_{name}"] = _ok("export-hf", str(r / name), str(r / f"hf_out_{name}"))
    spawn(logits_job, 1, str(r))
    for name, text in logs.items():
        (r / f"{name}.log").write_text(text)
    return r


def test_imports_and_exports_without_a_tokenizer(chain):
    assert "has no tokenizer files" in (chain / "import_a.log").read_text()
    for name in ("ck_a", "pruned_a", "merged"):
        assert not (chain / name / "tokenizer").exists()
        assert "has no tokenizer" in (chain / f"export_{name}.log").read_text()
        files = {p.name for p in (chain / f"hf_out_{name}").iterdir()}
        assert {"config.json", "model.safetensors"} <= files
        assert not {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} & files


def test_unpruned_export_equals_the_source_in_transformers(chain):
    torch.testing.assert_close(hf_logits(chain / "hf_out_ck_a", tokens()),
                               hf_logits(chain / "hf_a", tokens()), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["pruned_a", "merged"])
def test_pruned_and_merged_exports_equal_our_models(chain, name):
    ours = torch.load(chain / f"ours_{name}.pt")
    assert ours.shape == (2, 16, 160)
    theirs = hf_logits(chain / f"hf_out_{name}", tokens())
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    # Not the unpruned model: the check has teeth.
    assert (theirs - hf_logits(chain / "hf_a", tokens())).abs().max() > 1e-2


def test_adding_a_tokenizer_as_the_error_says(chain, tmp_path):
    import shutil

    ckpt = tmp_path / "ck"
    shutil.copytree(chain / "ck_a", ckpt)
    res = run_cli("generate", str(ckpt), "--prompt", "w1 w2", "--max-new-tokens", "2")
    assert res.returncode == 2 and "has no tokenizer" in res.stderr
    shutil.copytree(chain / "tok", ckpt / "tokenizer")  # what the one-line error says to do
    res = run_cli("generate", str(ckpt), "--prompt", "w1 w2", "--max-new-tokens", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert '"prompt": "w1 w2"' in res.stdout

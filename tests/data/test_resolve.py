"""A checkpoint reads its own tokens (``data.resolve``). A model trained on another tokenizer's
tokens than the embedded corpus' is pruned and distilled with the default data settings: its
losses equal those on the corpus built explicitly with ``data --tokenizer`` (the workaround
before), and lie far below the same model's loss on the embedded tokenization of the same text,
recomputed with torch from sentencepiece's own encoding. Plus the tokenizer record's checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nemo_minitron.config import ConfigError, DataConfig
from nemo_minitron.data.corpus import read_documents, stdlib_files
from nemo_minitron.data.tokenizer import load_tokenizer, train_sentencepiece
from tests.cli import cli
from tests.dist import in_order, spawn
from tests.helpers.data import SMALL_DATA, kept_records
from tests.helpers.train import pretrain_job

SMALL = SMALL_DATA["corpus_max_bytes"]


@pytest.fixture(scope="module")
def own(tmp_path_factory, tiny_overrides) -> dict[str, str]:
    """A tiny model trained (40 steps) on the small corpus tokenized by a 384-piece
    sentencepiece model trained on other text; its embedding has the embedded tokenizer's
    1024 rows, so that either tokenization fits it."""
    root = tmp_path_factory.mktemp("own")
    rest = stdlib_files(2 * SMALL)[len(stdlib_files(SMALL)):]
    train_sentencepiece(read_documents(rest), 384, root / "own.model")
    corpus = str(root / "corpus" / "corpus")
    res = cli("data", "--tokenizer", str(root / "own.model"), "--output-prefix", corpus,
              "--corpus-max-bytes", str(SMALL))
    assert res.returncode == 0, res.stderr
    spawn(pretrain_job, 1, str(root / "run"), tiny_overrides + [
        f"data.path={corpus}", f"data.tokenizer={root / 'own.model'}", "train.train_iters=40",
        "train.eval_interval=0", "train.lr=3e-3", "model.vocab_size=1024"])
    return {"ckpt": str(root / "run" / "checkpoints" / "step_0000040"), "corpus": corpus,
            "model": str(root / "own.model")}


def _prune(ckpt: str, out: str, overrides: list[str]) -> None:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.prune.stage import PruneRecipe, prune

    prune(ckpt, out, load_recipe(None, overrides, cls=PruneRecipe))


def _distill(teacher: str, student: str, out: str, overrides: list[str]) -> None:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.distill.stage import DistillRecipe, distill

    summary = distill(load_recipe(None, overrides, cls=DistillRecipe), teacher, student, out)
    Path(out, "teacher.json").write_text(json.dumps(summary["teacher_valid_loss"]))


def _direct_losses(ckpt: str, models: dict[str, str], out: str) -> None:
    """The model's mean LM loss on the last 40 small-corpus files, encoded by sentencepiece
    itself with each model (documents + eos, cut into 16 windows of 65 tokens)."""
    import sentencepiece as spm
    import torch
    import torch.nn.functional as F

    from nemo_minitron.checkpoint.io import load_model
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.forward import forward_logits

    model, _, _ = load_model(ckpt, ParallelConfig())
    docs = list(read_documents(stdlib_files(SMALL)[-40:]))
    losses = {}
    for name, path in models.items():
        sp = spm.SentencePieceProcessor(model_file=path)
        ids = [i for d in docs for i in sp.encode(d) + [sp.eos_id()]]
        w = torch.tensor(ids[:16 * 65]).reshape(16, 65)
        with torch.no_grad():
            logits = forward_logits(model, w[:, :-1]).float()
        losses[name] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       w[:, 1:].reshape(-1)).item()
    Path(out).write_text(json.dumps(losses))


def _rows(run: Path, kind: str) -> dict[int, dict[str, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == kind}


def test_prune_and_distill_score_the_checkpoints_own_tokens(tmp_path, own, tiny_overrides,
                                                            embedded_paths):
    data = [o for o in tiny_overrides if o.startswith("data.")]
    explicit = [f"data.path={own['corpus']}"]
    prune = data + ["target.num_layers=1", "calib.num_samples=8", "calib.micro_batch_size=4",
                    "calib.eval_samples=16"]
    kd = data + ["train.train_iters=2", "train.micro_batch_size=2", "train.global_batch_size=4",
                 "train.eval_interval=1", "train.eval_iters=2", "train.tensorboard=false",
                 "train.lr_warmup_iters=0"]
    student = str(tmp_path / "p_default")
    models = {"own": own["model"], "embedded": embedded_paths[1]}
    in_order_steps = [
        (_prune, (own["ckpt"], student, prune)),
        (_prune, (own["ckpt"], str(tmp_path / "p_explicit"), prune + explicit)),
        (_distill, (own["ckpt"], student, str(tmp_path / "d_default"), kd)),
        (_distill, (own["ckpt"], student, str(tmp_path / "d_explicit"), kd + explicit)),
        (_direct_losses, (own["ckpt"], models, str(tmp_path / "direct.json"))),
    ]
    spawn(in_order, 1, in_order_steps)

    def summary(name: str) -> dict:
        return json.loads((tmp_path / name / "pruning" / "summary.json").read_text())

    default, explicit_ = summary("p_default"), summary("p_explicit")
    for key in ("source_valid_loss", "pruned_valid_loss"):
        assert default[key] == pytest.approx(explicit_[key], abs=1e-6), key
    teacher = {n: json.loads((tmp_path / n / "teacher.json").read_text())
               for n in ("d_default", "d_explicit")}
    assert teacher["d_default"] == pytest.approx(teacher["d_explicit"], abs=1e-6)
    a, b = _rows(tmp_path / "d_default", "valid"), _rows(tmp_path / "d_explicit", "valid")
    assert sorted(a) == sorted(b) == [0, 1, 2]
    assert all(a[s]["lm loss"] == pytest.approx(b[s]["lm loss"], abs=1e-6) for s in a)
    direct = json.loads((tmp_path / "direct.json").read_text())
    # The model learnt its own tokens: the embedded encoding of the same text is far worse, and
    # the figures reported on the default data are of its own tokens.
    assert direct["embedded"] > direct["own"] + 1.0, direct
    assert abs(default["source_valid_loss"] - direct["own"]) < 0.5, (default, direct)
    assert default["source_valid_loss"] < direct["embedded"] - 1.0, (default, direct)
    assert teacher["d_default"] < direct["embedded"] - 1.0, (teacher, direct)


def test_embedded_corpus_of_the_trained_tokenizer_is_the_default_build(data_cache,
                                                                       embedded_paths):
    from nemo_minitron.data.resolve import resolve_data

    cfg = DataConfig(cache_dir=data_cache, **SMALL_DATA)
    prefix, tok = resolve_data(cfg, load_tokenizer(embedded_paths[1]))
    assert prefix == embedded_paths[0]  # no second build for a checkpoint pretrained here
    assert str(tok.path) == embedded_paths[1]


def test_dataset_record_is_checked(tmp_path, embedded_paths, own):
    from nemo_minitron.data.indexed import max_token_id, read_indexed_documents
    from nemo_minitron.data.resolve import check_prefix_tokenizer

    prefix, emb = embedded_paths[0], load_tokenizer(embedded_paths[1])
    other = load_tokenizer(own["model"])
    check_prefix_tokenizer(prefix, emb)  # its own tokenizer
    with pytest.raises(ConfigError, match=r"was tokenized by .*tokenizer.model.* not by the "
                                          r"checkpoint's tokenizer .*own.model"):
        check_prefix_tokenizer(prefix, other)
    # The record's largest id is the data's (numpy over the documents).
    assert max_token_id(prefix) == max(int(d.max()) for d in read_indexed_documents(prefix))
    # Without a record (an older build, another tool): a warning, once, and a scan.
    bare = tmp_path / "bare"
    for ext in (".bin", ".idx"):
        shutil.copyfile(prefix + ext, str(bare) + ext)
    with kept_records("nemo_minitron.data.resolve") as records:
        check_prefix_tokenizer(str(bare), other)
        check_prefix_tokenizer(str(bare), other)
    assert ["has no tokenizer record" in r.getMessage() for r in records] == [True]
    assert max_token_id(str(bare)) == max_token_id(prefix)

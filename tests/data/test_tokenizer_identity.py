"""``same_tokenizer``, the one test of tokenizer identity, agrees with the ``tokenizers``
library: two tokenizer directories are the same exactly when that library reads the same
vocabulary from them and encodes the same texts to the same ids, whatever their bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nemo_minitron.data.tokenizer import load_tokenizer, same_tokenizer
from tests.interop.hfmodels import save_tokenizer

TEXTS = ["w1 w5 w7", "w5 zz w3 w5", "<s> w2 </s> w9", "unknown words w4"]


def _reference(d: Path) -> tuple[dict[str, int], list[list[int]]]:
    """What the ``tokenizers`` library reads from ``d``: vocabulary and encodings."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    return tok.get_vocab(), [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]


def _variants(root: Path) -> dict[str, Path]:
    base = root / "base"
    save_tokenizer(base)
    out = {"base": base}
    out["saved_again"] = root / "saved_again"  # the same tokenizer saved in another directory
    save_tokenizer(out["saved_again"])
    out["resaved"] = root / "resaved"  # our save (a checkpoint's copy): other bytes
    load_tokenizer(base).save(out["resaved"])
    out["copy"] = Path(shutil.copytree(base, root / "copy"))  # byte-identical
    out["reformatted"] = Path(shutil.copytree(base, root / "reformatted"))
    f = out["reformatted"] / "tokenizer.json"
    f.write_text(json.dumps(json.loads(f.read_text()), indent=4))  # whitespace only
    out["added_token"] = root / "added_token"
    save_tokenizer(out["added_token"])
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out["added_token"] / "tokenizer.json"))
    tok.add_tokens(["zz"])
    tok.save(str(out["added_token"] / "tokenizer.json"))
    out["renamed_token"] = Path(shutil.copytree(base, root / "renamed_token"))  # same size
    f = out["renamed_token"] / "tokenizer.json"
    f.write_text(f.read_text().replace('"w5"', '"v5"'))
    return out


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    return _variants(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("name", ["base", "saved_again", "resaved", "copy", "reformatted",
                                  "added_token", "renamed_token"])
def test_same_tokenizer_agrees_with_the_tokenizers_library(variants, name):
    base, other = load_tokenizer(variants["base"]), load_tokenizer(variants[name])
    want = _reference(variants["base"]) == _reference(variants[name])
    assert same_tokenizer(base, other) is want
    assert same_tokenizer(other, base) is want
    # The cases are what their names say (the reference tells them apart).
    assert want is (name not in ("added_token", "renamed_token")), name

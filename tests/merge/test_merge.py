"""``merge`` against mergekit (the independent reference): tiny transformers models are merged
by mergekit directly and by us after import-hf; our output, exported with export-hf, must equal
mergekit's tensor for tensor.

One spawned process does all the single-process work (imports, merges, exports, mergekit);
one 2-process job merges TP=2 checkpoints. The tests then only compare files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from nemo_minitron.checkpoint.manifest import write_manifest
from tests.dist import spawn

LAYERS = 3  # depths 0, 0.5, 1: a gradient list is interpolated between its entries
FILTER_T = [{"filter": "self_attn", "value": [0.1, 0.8, 0.3, 0.9]},
            {"filter": "mlp", "value": [0.9, 0.2, 0.6]},
            {"filter": "*", "value": 0.35}]
# name -> (our merge arguments, mergekit configuration builder)
CASES = {
    "slerp_scalar": (["--method", "slerp", "merge.t=0.3"], "slerp", {"t": 0.3}),
    "slerp_gradient": (["merge.t=[0.0,0.2,0.9,1.0]"], "slerp", {"t": [0.0, 0.2, 0.9, 1.0]}),
    "slerp_filters": ([f"merge.t={json.dumps(FILTER_T)}"], "slerp", {"t": FILTER_T}),
    "linear": (["--method", "linear", "merge.weights=[0.7,0.3]"], "linear", None),
    "task": (["--method", "task", "merge.weights=[0.6,0.4]", "merge.scale=0.8"], "task", None),
}


def _hf(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _scaled_copy(src: Path, dst: Path, factor: float) -> None:
    """An HF directory whose tensors are ``factor`` times those of ``src`` (colinear)."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    save_file({k: v * factor for k, v in _hf(src).items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})


def _mergekit(root: Path, name: str, method: str, params: dict | None) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    a, b, p = (str(root / f"hf_{x}") for x in "abp")
    if method == "slerp":
        cfg = {"merge_method": "slerp", "base_model": a, "parameters": params,
               "slices": [{"sources": [{"model": a, "layer_range": [0, LAYERS]},
                                       {"model": b, "layer_range": [0, LAYERS]}]}]}
    elif method == "linear":
        cfg = {"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": 0.7}},
            {"model": b, "parameters": {"weight": 0.3}}]}
    else:
        cfg = {"merge_method": "task_arithmetic", "base_model": p,
               "parameters": {"lambda": 0.8},
               "models": [{"model": a, "parameters": {"weight": 0.6}},
                          {"model": b, "parameters": {"weight": 0.4}}]}
    cfg["dtype"] = "float32"
    run_merge(MergeConfiguration.model_validate(cfg), str(root / f"mk_{name}"),
              MergeOptions(copy_tokenizer=False))


def single_job(root: str) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from nemo_minitron.cli import main
    from nemo_minitron.interop.hf_export import export_hf
    from nemo_minitron.interop.hf_import import import_hf
    from tests.interop.hfmodels import save_hf_model

    r = Path(root)
    for seed, x in enumerate("abp"):
        save_hf_model(r / f"hf_{x}", seed=seed, num_hidden_layers=LAYERS)
    save_hf_model(r / "hf_wide", seed=3, num_hidden_layers=LAYERS, intermediate_size=256)
    _scaled_copy(r / "hf_a", r / "hf_a2", 2.0)
    for x in ("a", "b", "p", "a2", "wide"):
        import_hf(r / f"hf_{x}", r / f"ck_{x}")

    def merge(name: str, *args: str, base: str = "a", others: tuple[str, ...] = ("b",)) -> None:
        argv = ["merge", "--base", str(r / f"ck_{base}"), "--out", str(r / f"ck_{name}")]
        for o in others:
            argv += ["--other", str(r / f"ck_{o}")]
        assert main(argv + list(args)) == 0, name
        export_hf(r / f"ck_{name}", r / f"out_{name}")

    for name, (args, method, params) in CASES.items():
        if method == "task":
            merge(name, *args, base="p", others=("a", "b"))
        else:
            merge(name, *args)
        _mergekit(r, name, method, params)
    merge("t0", "merge.t=0")
    merge("t1", "merge.t=1")
    merge("self", "merge.t=0.4", others=("a",))
    merge("colinear", "merge.t=0.25", others=("a2",))
    merge("task_slerp", "--method", "task", "merge.combine=slerp", "merge.t=0.4",
          base="p", others=("a", "b"))


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge")
    spawn(single_job, 1, str(root))
    return root


def _assert_close(ours: dict, ref: dict, atol: float = 1e-6) -> None:
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k].shape == ref[k].shape, k
        err = (ours[k].float() - ref[k].float()).abs().max().item()
        assert err <= atol, f"{k}: max |ours - reference| = {err}"


@pytest.mark.parametrize("name", list(CASES))
def test_equals_mergekit(single, name):
    ours, ref = _hf(single / f"out_{name}"), _hf(single / f"mk_{name}")
    _assert_close(ours, ref)
    a = _hf(single / "hf_a")
    assert any((ours[k] - a[k]).abs().max() > 1e-3 for k in a)  # it did merge


def test_t0_t1_and_self_merge_reproduce_inputs(single):
    a, b = _hf(single / "hf_a"), _hf(single / "hf_b")
    for name, ref in (("t0", a), ("t1", b), ("self", a)):
        ours = _hf(single / f"out_{name}")
        assert sorted(ours) == sorted(ref)
        for k in ref:
            assert torch.equal(ours[k], ref[k]), (name, k)


def test_colinear_fallback_interpolates_linearly(single):
    """B = 2 A: every tensor pair is colinear, slerp falls back to (1 - t) A + t B."""
    from nemo_minitron.merge.run import merge_record

    a, ours = _hf(single / "hf_a"), _hf(single / "out_colinear")
    record = merge_record(single / "ck_colinear")
    assert record["merge"]["t"] == 0.25
    assert record["colinear_fallbacks"] == len(a)  # one per logical (HF) tensor
    plain = merge_record(single / "ck_slerp_scalar")
    assert plain["colinear_fallbacks"] == 0
    assert merge_record(single / "ck_a") is None  # an import, not a merge
    for k in a:
        torch.testing.assert_close(ours[k], 0.75 * a[k] + 0.25 * (2 * a[k]), rtol=0, atol=1e-6)


def test_merge_record_of_an_older_merge_is_its_merge_json(single, tmp_path):
    """Merges written before the checkpoint writer kept their record in ``merge.json``."""
    from nemo_minitron.merge.run import merge_record

    old = tmp_path / "ck_old"
    shutil.copytree(single / "ck_colinear", old)
    (old / "metadata.json").unlink()
    written = {"merge": {"method": "slerp", "t": 0.25}, "colinear_fallbacks": 3}
    (old / "merge.json").write_text(json.dumps(written))
    assert merge_record(old) == written


def test_task_slerp_equals_mergekit_slerp_of_task_vectors(single):
    from mergekit.merge_methods.slerp import slerp

    p, a, b = (_hf(single / f"hf_{x}") for x in "pab")
    ours = _hf(single / "out_task_slerp")
    for k in p:
        ref = p[k] + slerp(torch.tensor([0.4]), (a[k] - p[k])[None], (b[k] - p[k])[None])[0]
        torch.testing.assert_close(ours[k], ref, rtol=0, atol=1e-6)


# --- TP=2 checkpoints merged by 2 processes ---------------------------------------------------

def parallel_job(root: str, single_root: str) -> None:
    import torch.distributed as dist

    from nemo_minitron.checkpoint.io import load_model_config, load_weights
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.interop.hf_import import import_hf
    from nemo_minitron.merge.config import MergeConfig
    from nemo_minitron.merge.run import merge_checkpoints
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.full_state import gather_full_state_dict
    from nemo_minitron.parallel.runtime import init_distributed

    r, s = Path(root), Path(single_root)
    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    for x in "ab":
        import_hf(s / f"hf_{x}", r / f"ck_{x}", tp2)
    slerp = MergeConfig(method="slerp", t=0.3)
    merge_checkpoints(r / "ck_a", [str(r / "ck_b")], r / "merged", slerp)
    # Inputs saved under different layouts: TP=2 base, TP=1 other.
    merge_checkpoints(r / "ck_a", [str(s / "ck_b")], r / "mixed", slerp)
    # The merged checkpoint loads under TP=2 too.
    init_distributed(tp2)
    model = build_model(load_model_config(r / "merged"))
    load_weights(r / "merged", model)
    full = gather_full_state_dict(model)
    if dist.get_rank() == 0:
        torch.save(full, r / "full.pt")


@pytest.mark.dist
def test_tp2_two_process_merge_equals_single_process_tp1_merge(single, tmp_path):
    from nemo_minitron.checkpoint.io import load_model_config
    from nemo_minitron.interop.hf_weights import hf_tensors
    from nemo_minitron.merge.store import CheckpointReader

    spawn(parallel_job, 2, str(tmp_path), str(single))
    # The inputs really were saved sharded: more chunks than layers for linear_qkv.
    reader = CheckpointReader(tmp_path / "ck_a" / "weights")
    assert len(reader.chunks["decoder.layers.self_attention.linear_qkv.weight"]) == 2 * LAYERS
    cfg = load_model_config(tmp_path / "merged")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    ours = dict(hf_tensors(full, cfg))
    for k, v in _hf(single / "out_slerp_scalar").items():
        assert torch.equal(ours[k], v), k
    merged = CheckpointReader(tmp_path / "merged" / "weights")
    mixed = CheckpointReader(tmp_path / "mixed" / "weights")
    assert merged.tensors == mixed.tensors
    for key, info in merged.tensors.items():
        zeros = (0,) * len(info.shape)
        assert torch.equal(merged.read(key, zeros, info.shape), mixed.read(key, zeros, info.shape))


# --- bad input ----------------------------------------------------------------------------------

def _run(argv: list[str], capsys) -> tuple[int, str]:
    from nemo_minitron.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


def _corrupt(tmp: Path, src: str) -> Path:
    """A copy of ``src`` with one flipped byte in a weights file."""
    bad = tmp / "ck_corrupt"
    shutil.copytree(src, bad)
    f = next(p for p in sorted((bad / "weights").iterdir()) if p.suffix == ".distcp")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return bad


def test_bad_inputs_are_one_line_errors(single, tmp_path, capsys):
    a, b = str(single / "ck_a"), str(single / "ck_b")
    out = tmp_path / "out"
    other_tok = tmp_path / "ck_tok"
    shutil.copytree(b, other_tok)
    # One token renamed: same size, another vocabulary (a byte-only change is the same tokenizer).
    tok_file = other_tok / "tokenizer" / "tokenizer.json"
    tok_file.write_text(tok_file.read_text().replace('"w5"', '"v5"'))
    write_manifest(other_tok)  # a consistent checkpoint with another tokenizer, not a corrupt one
    cases = [
        (["--other", str(_corrupt(tmp_path, b))], "is corrupt"),
        (["--other", str(tmp_path / "nope")], "--other='"),
        (["--other", b, "merge.t=1.5"], "merge.t=1.5 is outside [0.0, 1.0]"),
        (["--other", b, "merge.t=[0.2,-0.1]"], "merge.t[1]=-0.1 is outside"),
        (["--other", str(other_tok)], "different tokenizer"),
        (["--other", b, "--other", b], "exactly one --other"),
        (["--other", b, "merge.t=[{filter: mlp, value: 0.5}]"], "no rule of merge.t matches"),
    ]
    for extra, message in cases:
        rc, err = _run(["merge", "--base", a, "--out", str(out)] + extra, capsys)
        assert rc == 2 and err.startswith("error: ") and "\n" not in err, (extra, err)
        assert message in err, (extra, err)
        assert not out.exists() and not out.with_name("out.tmp").exists()
    out.mkdir()
    rc, err = _run(["merge", "--base", a, "--other", b, "--out", str(out)], capsys)
    assert rc == 2 and "already exists" in err


def test_architecture_mismatch_names_the_tensor_or_field(single, tmp_path, capsys):
    a = str(single / "ck_a")
    rc, err = _run(["merge", "--base", a, "--other", str(single / "ck_wide"), "--out",
                    str(tmp_path / "o")], capsys)
    assert rc == 2 and "\n" not in err, err
    assert "tensor 'decoder.layers.mlp.linear_fc1.weight' is [3, 512, 64]" in err, err
    same_shapes = tmp_path / "ck_rope"
    shutil.copytree(single / "ck_b", same_shapes)
    cfg = same_shapes / "model_config.yaml"
    cfg.write_text(cfg.read_text().replace("rotary_base: 10000", "rotary_base: 500000"))
    write_manifest(same_shapes)  # another (consistent) checkpoint, not a corrupt one
    rc, err = _run(["merge", "--base", a, "--other", str(same_shapes), "--out",
                    str(tmp_path / "o")], capsys)
    assert rc == 2 and "model.rotary_base=500000" in err, err
    assert not (tmp_path / "o").exists()


def test_unmatched_rule_warns(single, tmp_path, capsys):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logging.getLogger("nemo_minitron.merge").addHandler(handler)
    try:
        rule = '[{filter: nothing_like_this, value: 0.1}, {value: 0.5}]'
        rc, _ = _run(["merge", "--base", str(single / "ck_a"), "--other", str(single / "ck_b"),
                      "--out", str(tmp_path / "o"), f"merge.t={rule}"], capsys)
    finally:
        logging.getLogger("nemo_minitron.merge").removeHandler(handler)
    assert rc == 0
    assert any("nothing_like_this" in r.getMessage() and r.levelno == logging.WARNING
               for r in records)


def test_self_merge_warns_once(single, tmp_path, capsys):
    # The same checkpoint under two spellings of its path; the merged model is the input.
    rc, err = _run(["merge", "--base", str(single / "ck_a"), "--other",
                    str(single / "ck_b" / ".." / "ck_a") + "/", "--out", str(tmp_path / "o")],
                   capsys)
    assert rc == 0, err
    warned = [x for x in err.splitlines() if "are the same checkpoint" in x]
    assert len(warned) == 1 and "--other and --base" in warned[0], err

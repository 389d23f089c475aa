"""The search verb end to end on a briefly trained tiny teacher: cut after the first candidate,
resumed without redoing it, ranked, reported, the winner loads and evaluates; a user scoring
function re-ranks; bad budgets are one-line errors. On a tiny MoE teacher with the budget on
active parameters: the candidate, pruned to its experts, and the report."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tests.cli import _one_line_error, cli, run_cli
from tests.dist import spawn
from tests.helpers.launch import _args

# Source: 4 layers, hidden 64, ffn 128, 4 heads in 2 groups, vocab 1024 (279,104 parameters).
# On hidden/ffn steps of 64 exactly three shapes lie within 1% of 205,200:
# L2-H64-F128-A4-G2 (205,120), L3-H64-F64-A4-G2 (205,248), L4-H64-F64-A2-G1 (205,376).
NAMES = {"L2-H64-F128-A4-G2": 205120, "L3-H64-F64-A4-G2": 205248, "L4-H64-F64-A2-G1": 205376}


def params_score(checkpoint: str) -> float:
    """A user score: the parameter count (fewest wins)."""
    from nemo_minitron.checkpoint.io import load_model_config
    from nemo_minitron.model.params import count_params

    return float(count_params(load_model_config(checkpoint)))


def _evaluate(ckpt: str, out: str) -> None:
    import torch

    from nemo_minitron.checkpoint.io import check_checkpoint, load_model_config, load_weights
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.forward import lm_loss
    from nemo_minitron.parallel.runtime import init_distributed

    check_checkpoint(ckpt)
    init_distributed(ParallelConfig())
    model = build_model(load_model_config(ckpt))
    load_weights(ckpt, model)
    tokens = torch.randint(0, 1000, (4, 65), generator=torch.Generator().manual_seed(0))
    torch.save(lm_loss(model, tokens, 2), out)


def _loop_valid_losses(pruned: list[str], args: list[str], out: str) -> None:
    """Each pruned checkpoint's LM loss on the retraining loop's validation set (the first
    eval_iters x global_batch_size sequences of the validation split, sized as the loop sizes
    it), recomputed with torch's cross-entropy over the model's logits."""
    import torch
    import torch.nn.functional as F

    from nemo_minitron.checkpoint.io import load_model
    from nemo_minitron.config import ParallelConfig, load_recipe
    from nemo_minitron.data.datasets import build_gpt_datasets
    from nemo_minitron.data.resolve import resolve_data
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.search.stage import SearchRecipe

    recipe = load_recipe(None, args, cls=SearchRecipe)
    t, n_valid = recipe.train, recipe.train.eval_iters * recipe.train.global_batch_size
    losses = []
    for ckpt in pruned:
        model, cfg, tokenizer = load_model(ckpt, ParallelConfig())
        prefix, tokenizer = resolve_data(recipe.data, tokenizer)
        valid = build_gpt_datasets(
            prefix, tokenizer, seq_length=cfg.seq_length, split=recipe.data.split,
            seed=recipe.data.seed,
            num_samples=(recipe.search.retrain_steps * t.global_batch_size, n_valid, 0)).valid
        samples = [valid[i] for i in range(n_valid)]
        assert all(bool(s["loss_mask"].all()) for s in samples)  # every token counts
        tokens = torch.stack([s["tokens"] for s in samples])
        labels = torch.stack([s["labels"] for s in samples])
        logits = forward_logits(model, tokens, t.micro_batch_size)
        losses.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item())
    torch.save(losses, out)


def test_search_resumes_ranks_and_reports(tmp_path, teacher, tiny_overrides):
    stats = pytest.importorskip("scipy.stats")
    out = tmp_path / "out"
    root = out / "search"
    res = run_cli("search", teacher, str(out), *_args(tiny_overrides),
                  "search.max_candidates_per_run=1")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["finished"] is False
    state = json.loads((root / "candidates.json").read_text())
    assert {r["name"]: r["params"] for r in state["candidates"]} == NAMES
    first, *rest = state["candidates"]
    assert first["status"] == "done" and all(r["status"] == "pending" for r in rest)
    assert not (root / "report.md").exists() and not (out / "winner").exists()
    cdir = root / "candidates" / first["name"]
    metrics = (cdir / "distill" / "metrics.jsonl").read_text()
    pruned_mtime = (cdir / "pruned" / "pruning" / "summary.json").stat().st_mtime_ns
    assert (root / "scores.pt").is_file()

    # A run restricted to one candidate (as one job of several would be) retrains only it;
    # this one reads the teacher's logits from a cache, validation included (train.eval_interval
    # is 1): its training and validation samples are cached once.
    third = "L4-H64-F64-A2-G1"
    res = run_cli("search", teacher, str(out), *_args(tiny_overrides),
                  f"search.candidates=[{third}]", "search.teacher_cache=true")
    assert res.returncode == 0, res.stderr
    meta = json.loads((root / "teacher_cache" / "meta.json").read_text())
    assert (meta["num_samples"], meta["valid_samples"]) == (16, 16)
    assert json.loads(res.stdout) == {"finished": False, "interrupted": False,
                                      "remaining": ["L2-H64-F128-A4-G2"]}
    assert json.loads((root / "candidates" / third / "result.json").read_text())["status"] \
        == "done"
    third_metrics = (root / "candidates" / third / "distill" / "metrics.jsonl").read_text()

    res = run_cli("search", teacher, str(out), *_args(tiny_overrides))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["finished"] is True
    assert (root / "candidates" / third / "distill" / "metrics.jsonl").read_text() \
        == third_metrics
    # The finished candidate was not re-run: neither re-pruned nor re-distilled.
    assert (cdir / "distill" / "metrics.jsonl").read_text() == metrics
    assert (cdir / "pruned" / "pruning" / "summary.json").stat().st_mtime_ns == pruned_mtime
    assert f"candidate {first['name']}: finished earlier, skipped" in res.stderr
    records = json.loads((root / "candidates.json").read_text())["candidates"]
    assert all(r["status"] == "done" for r in records)
    for r in records:
        assert [s for s, _ in r["curve"]] == [0, 1, 2]
        assert r["retrained_loss"] == r["curve"][-1][1] < r["curve"][0][1]
        assert math.isfinite(r["one_shot_loss"])
    # One validation set per comparison: the report's one-shot loss is the curve's step 0,
    # and both are each pruned checkpoint's loss on the retraining's validation samples.
    report = (root / "report.md").read_text()
    for r in records:
        assert r["one_shot_loss"] == r["curve"][0][1]
        assert f"| {r['one_shot_loss']:.4f} | {r['retrained_loss']:.4f} |" in report
    spawn(_loop_valid_losses, 1, [str(root / "candidates" / r["name"] / "pruned")
                                  for r in records], _args(tiny_overrides),
          str(tmp_path / "one_shot.pt"))
    import torch

    recomputed = torch.load(tmp_path / "one_shot.pt")
    assert [r["one_shot_loss"] for r in records] == pytest.approx(recomputed, abs=2e-5)
    best = min(records, key=lambda r: r["retrained_loss"])
    assert summary["winner"] == best["name"]
    want = stats.spearmanr([r["one_shot_loss"] for r in records],
                           [r["retrained_loss"] for r in records]).statistic
    assert summary["spearman"] == pytest.approx(want)
    for name in NAMES:
        assert f"| {name} |" in report
    assert "rank one-shot | rank retrained" in report
    assert f"Spearman correlation between the one-shot and retrained rankings: {want:.3f}" \
        in report
    assert (root / "loss_curves.png").stat().st_size > 1000
    # The winner is the retrained checkpoint of the best shape, and it loads and evaluates.
    winner = out / "winner"
    cfg = yaml.safe_load((winner / "model_config.yaml").read_text())
    assert f"L{cfg['num_layers']}-H{cfg['hidden_size']}-F{cfg['ffn_hidden_size']}" \
           f"-A{cfg['num_attention_heads']}-G{cfg['num_query_groups']}" == best["name"]
    spawn(_evaluate, 1, str(winner), str(tmp_path / "loss.pt"))
    assert 0 < torch.load(tmp_path / "loss.pt") < math.log(1000) + 1

    # A user score re-ranks the finished candidates without retraining any.
    res = run_cli("search", teacher, str(out), *_args(tiny_overrides),
                  "search.score_fn=tests.search.test_search:params_score")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["winner"] == "L2-H64-F128-A4-G2"  # the fewest parameters
    assert (cdir / "distill" / "metrics.jsonl").read_text() == metrics
    assert "score (tests.search.test_search:params_score)" in (root / "report.md").read_text()
    assert yaml.safe_load((winner / "model_config.yaml").read_text())["num_layers"] == 2


# The MoE source (205,632 parameters, 181,056 active): within 0.01% of 180,928 active
# parameters lies one shape, 4 -> 3 experts of the same width, 12% above it in total.
MOE_NAMES = {"L2-H64-E3-EF32-A4-G2": (193216, 180928)}


def test_moe_search_on_active_parameters(tmp_path, moe_teacher, tiny_overrides):
    out = tmp_path / "out"
    args = [a for a in _args(tiny_overrides) if not a.startswith(("search.target_params",
                                                                  "search.tolerance"))]
    res = run_cli("search", moe_teacher, str(out), *args, "search.budget=active",
                  "search.target_params=180928", "search.tolerance=0.0001",
                  "search.moe_ffn_hidden_size_step=16", "kd.teacher_max_loss_ratio=2")
    assert res.returncode == 0, res.stderr
    root = out / "search"
    records = json.loads((root / "candidates.json").read_text())["candidates"]
    assert {r["name"]: (r["params"], r["active_params"]) for r in records} == MOE_NAMES
    report = (root / "report.md").read_text()
    assert "Source: 205,632 parameters (181,056 active); budget 180,928 active" in report
    assert "| experts | expert ffn |" in report and "| 193,216 | 180,928 |" in report
    (r,) = records  # pruned to 3 experts of the source's width, and retrained
    cfg = yaml.safe_load((root / "candidates" / r["name"] / "pruned" /
                          "model_config.yaml").read_text())
    assert (cfg["num_moe_experts"], cfg["moe_ffn_hidden_size"], cfg["num_layers"]) == (3, 32, 2)
    assert r["status"] == "done" and math.isfinite(r["retrained_loss"])
    assert yaml.safe_load((out / "winner" / "model_config.yaml").read_text())[
        "num_moe_experts"] == 3


@pytest.mark.parametrize("extra, needles", [
    # The source's count (the header's, by hand) and the nearest shape with its count: what a
    # user needs to pick a budget. Which budgets are refused is tested in test_enumerate.py.
    (["search.target_params=10000000"], ["search.target_params=10000000 is not below",
                                         "279104"]),
    (["search.target_params=100000"], ["no candidate within", "nearest: L2-H64-F64-A2-G1 "
                                       "(168256)"]),
])
def test_bad_budget_is_a_one_line_error_naming_the_counts(tmp_path, teacher, tiny_overrides,
                                                          extra, needles):
    out = tmp_path / "out"
    args = [a for a in _args(tiny_overrides) if not a.startswith("search.target_params")]
    res = cli("search", teacher, str(out), *args, *extra)
    _one_line_error(res, *needles)
    assert not out.exists()


@pytest.mark.parametrize("extra, needle", [
    (["search.score_fn=no_such_module:f"], "search.score_fn='no_such_module:f' cannot be"),
    (["search.score_fn=math"], "search.score_fn='math' must look like module:function"),
    (["train.eval_interval=0"], "train.eval_interval=0"),
    (["search.candidates=[L9-H1-F1-A1-G1]"], "search.candidates names 'L9-H1-F1-A1-G1', not a"),
])
def test_bad_settings_write_nothing(tmp_path, teacher, tiny_overrides, extra, needle):
    # Checked before any parallel state or file: safe in the test process.
    from nemo_minitron.config import ConfigError, load_recipe
    from nemo_minitron.search.stage import SearchRecipe, search

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=needle):  # building the recipe, or the search
        search(teacher, str(out), load_recipe(None, _args(tiny_overrides) + extra,
                                              cls=SearchRecipe))
    assert not out.exists()


def test_help_names_the_grid_keys():
    res = cli("search", "--help")
    assert res.returncode == 0 and "search.target_params" in res.stdout

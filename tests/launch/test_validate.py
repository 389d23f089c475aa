"""Every shipped recipe validates; the layout and memory rules reject what cannot run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.method import load_bench_recipe
from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.launch.run import run_validate
from nemo_minitron.launch.validate import memory_gib
from nemo_minitron.model.params import count_params
from tests.cli import cli

ALL = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
# The recipes that are not jobs by themselves, and the verb the refusal must name: bench-method's
# are benchmarks; the others' verbs take input paths (run them with the verb, or as stages).
REFUSED = {"method_bench.yaml": "bench-method", "method_bench_smollm2.yaml": "bench-method",
           "method_bench_smollm2_instruct.yaml": "bench-method",
           "method_bench_moe.yaml": "bench-method", "sft.yaml": "sft",
           "merge.yaml": "merge", "tiny_cpu_prune.yaml": "prune",
           "tiny_cpu_distill.yaml": "distill", "tiny_cpu_distill_instruct.yaml": "distill"}
RECIPES = [p for p in ALL if p.name not in REFUSED]
NO_FLAGS = dict.fromkeys(("nodes", "gpus_per_node", "tasks_per_node"))


@pytest.mark.parametrize("recipe", ALL, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_as_written_or_names_its_verb(recipe):
    """``nemo-minitron validate RECIPE`` exactly as a user types it, no flags."""
    r = cli("validate", str(recipe))
    if recipe.name in REFUSED:
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert re.search(f"`nemo-minitron {REFUSED[recipe.name]}[` ]", r.stderr), r.stderr
        return
    assert r.returncode == 0, r.stderr
    reports = json.loads(r.stdout)
    assert reports and all(rep["params"] > 0 for rep in reports), reports
    # CPU jobs (the tiny recipes) have no GPU memory estimate; every stage of a GPU job has
    # one, and it fits an 80 GiB GPU: a run of estimates missing fails here.
    cpu = recipe.name.startswith("tiny_cpu")
    assert [rep["memory_gib"] is None for rep in reports] == [cpu] * len(reports), reports
    assert cpu or all(0 < rep["memory_gib"] < 80 for rep in reports), reports
    if recipe.name == "tiny_cpu.yaml":  # the demo's teacher: one CPU process, as demo runs it
        assert [rep["world_size"] for rep in reports] == [1]


def test_the_benchmark_recipe_is_not_a_job():
    bench = RECIPES[0].parent / "method_bench.yaml"
    assert load_bench_recipe(bench, []).retrain.train_iters == 200
    with pytest.raises(ConfigError, match="is a bench-method recipe: run `nemo-minitron "
                                          "bench-method"):
        run_validate(str(bench), [], flags=NO_FLAGS, gpu_memory_gb=80)


def test_published_shapes_have_the_published_sizes():
    by_stage = {r["name"]: r for r in run_validate(
        str(RECIPES[0].parent / "nemotron4_15b_to_8b_to_4b.yaml"), [], flags=NO_FLAGS,
        gpu_memory_gb=80)}
    # Stage params are those of the model the stage trains (prune: its source).
    assert round(by_stage["correct15"]["params"] / 1e9, 1) == 15.6
    assert round(by_stage["distill8"]["params"] / 1e9, 1) == 8.3
    assert round(by_stage["distill4"]["params"] / 1e9, 1) == 4.2
    width = run_validate(str(RECIPES[0].parent / "llama31_8b_to_4b_width.yaml"), [],
                         flags=NO_FLAGS, gpu_memory_gb=80)
    assert [round(r["params"] / 1e9, 2) for r in width] == [8.03, 8.03, 4.51]


@pytest.mark.parametrize("flags,overrides,needle", [
    ({"nodes": 1, "gpus_per_node": 6}, [], "world size 6 is not divisible by"),
    ({}, ["correct.parallel.tensor_model_parallel_size=16"],
     "num_query_groups=8 is not divisible by parallel.tensor_model_parallel_size=16"),
    ({"nodes": 3}, ["correct.parallel.pipeline_model_parallel_size=3"],
     "num_layers=32 is not divisible by parallel.pipeline_model_parallel_size=3"),
    ({}, ["correct.train.global_batch_size=1150"], "global_batch_size=1150 is not divisible"),
    ({}, ["prune.target.ffn_hidden_size=20000"], "larger than the source"),
    ({}, ["correct.parallel.tensor_model_parallel_size=1"], "GiB per GPU"),
])
def test_layouts_that_cannot_run_are_one_line_errors(flags, overrides, needle):
    recipe = str(RECIPES[0].parent / "llama31_8b_to_4b_width.yaml")
    with pytest.raises(ConfigError, match="^stage [a-z0-9]+: ") as e:
        run_validate(recipe, overrides, flags={**NO_FLAGS, **flags}, gpu_memory_gb=80)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_memory_estimate_by_hand():
    # One 2-layer MHA GeLU model, TP=PP=DP=1: every term of the documented formula by hand.
    m = ModelConfig(num_layers=2, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=8,
                    vocab_size=32000, seq_length=2048, activation="gelu")
    s, b, h, f, v = 2048, 1, 1024, 4096, 32000
    states = 18 * (count_params(m) - h)  # the final norm is left out of the estimate
    acts = 2 * (2 * s * b * (4 * h + 3 * h + h + f + f))
    logits = 2 * 4 * s * b * v
    want = (states + acts + logits) / 1024**3 + 5
    assert memory_gib(m, tp=1, pp=1, dp=1, micro_batch=1) == pytest.approx(want)


@pytest.mark.parametrize("config, needle", [
    ({"calib": {"num_samples": 6, "micro_batch_size": 4}},
     "calib.num_samples=6 must be a positive multiple of calib.micro_batch_size=4"),
    ({"search": {"target_params": 1000}, "train": {"eval_interval": 0}},
     "train.eval_interval=0: the search needs validation"),
    ({"kd": {"temperature": 0}}, r"kd.temperature=0(\.0)? must be > 0"),
])
def test_stage_sections_are_checked_when_the_recipe_is_built(config, needle):
    # No process, no checkpoint: every section validates itself in __post_init__.
    from nemo_minitron.config import ConfigError, from_dict
    from nemo_minitron.distill.stage import DistillRecipe
    from nemo_minitron.prune.stage import PruneRecipe
    from nemo_minitron.search.stage import SearchRecipe

    cls = SearchRecipe if "search" in config else DistillRecipe if "kd" in config \
        else PruneRecipe
    with pytest.raises(ConfigError, match=needle):
        from_dict(cls, config)


def test_verb_recipes_load_with_their_verb_and_are_not_plain_jobs():
    from nemo_minitron.config import load_recipe
    from nemo_minitron.merge.config import MergeRecipe
    from nemo_minitron.train.sft import SFTRecipe

    root = ALL[0].parent
    assert load_recipe(str(root / "sft.yaml"), [], cls=SFTRecipe).train.lr > 0
    assert load_recipe(str(root / "merge.yaml"), [], cls=MergeRecipe).merge is not None
    assert load_bench_recipe(root / "method_bench_smollm2.yaml", []) is not None
    for name, verb in (("sft.yaml", "sft"), ("merge.yaml", "merge")):
        with pytest.raises(ConfigError, match=f"is a {verb} recipe"):
            run_validate(str(root / name), [], flags=NO_FLAGS, gpu_memory_gb=80)

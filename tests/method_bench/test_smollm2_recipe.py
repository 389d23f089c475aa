"""The real-teacher benchmark recipe (recipes/method_bench_smollm2.yaml) is a valid
``bench-method`` recipe, without the model package: it loads, runs the four disputed
comparisons at one seed, and its fixed evaluation set is the retraining loop's validation set."""

from __future__ import annotations

from benchmarks.method.config import DEFAULT_RECIPE, load_bench_recipe


def test_smollm2_recipe_is_a_valid_bench_method_recipe():
    path = DEFAULT_RECIPE.with_name("method_bench_smollm2.yaml")
    r = load_bench_recipe(path, [])
    assert r.study.sections == ["criteria", "width_depth", "kd_vs_ce", "intermediate"]
    assert r.study.eval_samples == r.retrain.eval_iters * r.retrain.global_batch_size
    assert r.teacher.data.tokenizer == f"{r.study.teacher}/tokenizer"
    assert "import-gguf" in path.read_text() and r.teacher.data.path is not None

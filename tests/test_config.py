"""Recipe parsing and validation (``nemo_minitron/config.py``): overrides are YAML-typed and
nested, merged over the file, rebuilt into typed dataclasses; every refusal is one line naming
the field and the rule."""

from __future__ import annotations

import pytest
import yaml

from nemo_minitron.config import (
    ConfigError,
    ModelConfig,
    Recipe,
    from_dict,
    load_recipe,
    merge,
    parse_overrides,
    to_dict,
)


def test_overrides_are_yaml_typed_and_nested():
    got = parse_overrides(["train.lr=3e-4", "model.num_layers=2", "train.tensorboard=false",
                           "data.path=/a/b=c", "search.candidates=[L2, L3]", "model.kv_channels=",
                           "a.b.c=x y"])
    assert got == {"train": {"lr": 3e-4, "tensorboard": False},
                   "model": {"num_layers": 2, "kv_channels": None},
                   "data": {"path": "/a/b=c"}, "search": {"candidates": ["L2", "L3"]},
                   "a": {"b": {"c": "x y"}}}
    assert isinstance(got["train"]["lr"], float) and isinstance(got["model"]["num_layers"], int)


@pytest.mark.parametrize("item, needle", [
    ("train.lr", "override 'train.lr' must look like section.key=value"),
    ("=3", "override '=3' must look like section.key=value"),
    ("train..lr=3", "override 'train..lr=3' must look like section.key=value"),
])
def test_malformed_override(item, needle):
    with pytest.raises(ConfigError) as e:
        parse_overrides([item])
    assert str(e.value) == needle


def test_override_under_a_value_conflicts():
    with pytest.raises(ConfigError, match="^override 'train.lr.x=1' conflicts with an earlier"):
        parse_overrides(["train.lr=1", "train.lr.x=1"])


def test_merge_is_deep_and_leaves_its_inputs_alone():
    base = {"model": {"num_layers": 4, "hidden_size": 64}, "train": {"lr": 1.0}}
    over = {"model": {"num_layers": 2}, "data": {"path": "p"}}
    assert merge(base, over) == {"model": {"num_layers": 2, "hidden_size": 64},
                                 "train": {"lr": 1.0}, "data": {"path": "p"}}
    assert base["model"]["num_layers"] == 4 and over == {"model": {"num_layers": 2},
                                                         "data": {"path": "p"}}


def test_recipe_file_then_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  num_layers: 6\n  hidden_size: 96\ntrain:\n  lr: 0.01\n")
    r = load_recipe(path, ["model.num_layers=2", "train.min_lr=0.001"])
    assert (r.model.num_layers, r.model.hidden_size) == (2, 96)  # the override wins
    assert (r.train.lr, r.train.min_lr) == (0.01, 0.001)
    assert r.model.ffn_hidden_size == ModelConfig().ffn_hidden_size  # untouched default
    assert load_recipe(None) == Recipe()


def test_round_trip_through_yaml():
    cfg = ModelConfig(num_layers=3, hidden_size=48, ffn_hidden_size=96, num_attention_heads=6,
                      num_query_groups=2, kv_channels=16, vocab_size=384, activation="gelu",
                      rope_scaling_factor=8.0)
    text = yaml.safe_dump(to_dict(cfg))
    assert from_dict(ModelConfig, yaml.safe_load(text)) == cfg
    r = load_recipe(None, ["model.num_layers=3", "train.lr=2e-3"])
    assert from_dict(Recipe, yaml.safe_load(yaml.safe_dump(to_dict(r)))) == r


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], "unknown key 'train.lrr' (known: "),
    (["modle.num_layers=1"], "unknown key 'modle' (known: data, model, parallel, train)"),
    (["model=3"], "model must be a mapping, got 3"),
    (["train.lr=fast"], "train.lr='fast' must be a number"),
    (["model.num_layers=2.5"], "model.num_layers=2.5 must be an integer"),
    (["model.num_layers=true"], "model.num_layers=True must be an integer"),
    (["train.tensorboard=1"], "train.tensorboard=1 must be true or false"),
    (["model.activation=relu"],
     "model.activation='relu' must be one of ['swiglu', 'gelu', 'squared_relu']"),
    (["model.num_layers=0"], "model.num_layers=0 must be a positive number"),
    (["model.num_query_groups=0"], "model.num_query_groups=0 must be a positive number"),
    (["model.num_attention_heads=8", "model.num_query_groups=3"],
     "model.num_attention_heads=8 is not divisible by model.num_query_groups=3"),
    (["model.hidden_size=100", "model.num_attention_heads=8"],
     "model.hidden_size=100 is not divisible by model.num_attention_heads=8; set "
     "model.kv_channels"),
    (["train.lr_warmup_iters=-1"], "train.lr_warmup_iters=-1 must be >= 0"),
    (["train.lr=0.001", "train.min_lr=0.01"], "train.lr=0.001, train.min_lr=0.01: need "
                                              "0 <= min_lr <= lr and lr > 0"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"],
     "train.global_batch_size=6 is not divisible by train.micro_batch_size=4"),
])
def test_refusals_name_the_field_and_the_rule(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(None, overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_a_non_divisible_width_is_fine_with_kv_channels():
    cfg = ModelConfig(hidden_size=100, num_attention_heads=8, kv_channels=16)
    assert cfg.head_dim == 16 and cfg.query_groups == 8


@pytest.mark.parametrize("path_text, message", [
    (None, "does not exist"),
    ("model: [1, 2\n", "is not valid YAML at line 2"),
    ("- a\n", "must be a YAML mapping of sections"),
])
def test_recipe_file_errors(tmp_path, path_text, message):
    path = tmp_path / "r.yaml"
    if path_text is not None:
        path.write_text(path_text)
    with pytest.raises(ConfigError, match=f"^recipe '{path}' {message}"):
        load_recipe(path)


def test_an_empty_file_is_the_defaults(tmp_path):
    (tmp_path / "r.yaml").write_text("")
    assert load_recipe(tmp_path / "r.yaml") == Recipe()


@pytest.mark.parametrize("world, tp, pp, mbs, gbs, want", [
    (8, 2, 2, 2, 16, 2),  # DP = 8 / (2 * 2)
    (4, 1, 1, 4, 16, 4),
    (2, 2, 1, 4, 8, 1),
])
def test_data_parallel_size(world, tp, pp, mbs, gbs, want):
    r = load_recipe(None, [f"parallel.tensor_model_parallel_size={tp}",
                           f"parallel.pipeline_model_parallel_size={pp}",
                           f"train.micro_batch_size={mbs}", f"train.global_batch_size={gbs}"])
    assert r.validate_parallel(world) == want


@pytest.mark.parametrize("world, overrides, message", [
    (6, ["parallel.tensor_model_parallel_size=4"],
     "parallel: tensor_model_parallel_size * pipeline_model_parallel_size = 4 does not divide "
     "the world size 6"),
    (4, ["parallel.tensor_model_parallel_size=4", "model.num_query_groups=2"],
     "model.num_query_groups=2 is not divisible by parallel.tensor_model_parallel_size=4"),
    (2, ["parallel.pipeline_model_parallel_size=2", "model.num_layers=3"],
     "model.num_layers=3 is not divisible by parallel.pipeline_model_parallel_size=2"),
    (4, ["train.micro_batch_size=4", "train.global_batch_size=8"],
     "train.global_batch_size=8 is not divisible by train.micro_batch_size * data-parallel "
     "size = 16"),
])
def test_layout_refusals(world, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(None, overrides).validate_parallel(world)
    assert str(e.value) == message


def test_padded_vocabulary():
    cfg = ModelConfig()
    assert [cfg.padded_vocab_size(n) for n in (1, 128, 129, 1000)] == [128, 128, 256, 1024]


def test_a_partial_section_keeps_its_fields_own_defaults():
    """A nested section given in part keeps the defaults of the field that holds it, not those
    of the section's class: the bench's retraining budget (200 steps, not TrainConfig's) and
    self-distill's sampling (temperature 0.7, top-p 0.95, not SamplingConfig's greedy)."""
    from benchmarks.method.config import MethodBenchRecipe
    from nemo_minitron.config import TrainConfig
    from nemo_minitron.selfdistill.stage import SelfDistillConfig

    bench = from_dict(MethodBenchRecipe, {"retrain": {"lr": 0.5}})
    assert (bench.retrain.lr, bench.retrain.train_iters, bench.retrain.eval_interval) == (
        0.5, 200, 25)
    assert TrainConfig().train_iters != 200  # else this would not tell the two apart
    rewrite = from_dict(SelfDistillConfig, {"sampling": {"top_p": 0.5}})
    s = rewrite.sampling
    assert (s.greedy, s.temperature, s.top_p, s.max_new_tokens) == (False, 0.7, 0.5, 512)

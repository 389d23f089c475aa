"""Check that every stage of a pipeline fits its job before anything is submitted, without a
GPU: the divisibility rules of the parallel layout and an estimate of GPU memory.

Memory per GPU: ``model.memory.memory_gib`` (the sum must stay under ``gpu_memory_gb``, 80
by default; CPU jobs skip it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nemo_minitron.config import ConfigError, ModelConfig, Recipe, from_dict
from nemo_minitron.launch.pipeline import Pipeline, Stage
from nemo_minitron.launch.sbatch import ClusterConfig
from nemo_minitron.model.memory import memory_gib
from nemo_minitron.model.params import count_params
from nemo_minitron.verbs import BY_NAME

if TYPE_CHECKING:
    from nemo_minitron.search.enumerate import Candidate

_TRAIN_SECTIONS = ("model", "parallel", "data", "train")


@dataclass
class StageReport:
    """What ``validate`` found for one stage."""

    name: str
    """Stage name."""
    world_size: int
    """Processes of its job."""
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    dp: int
    """Data-parallel size."""
    params: int
    """Parameters of the model it trains (or prunes)."""
    memory_gib: float | None
    """Estimated peak memory per GPU (None for CPU jobs)."""


def _verb_recipe(stage: Stage) -> Any:
    """The stage's recipe as its verb reads it (``verbs.Verb.recipe``); other verbs are
    checked on the sections they share with pretraining."""
    cls = BY_NAME[stage.verb].recipe_class()
    if cls is not None:
        return from_dict(cls, stage.config)
    return from_dict(Recipe, {k: v for k, v in stage.config.items() if k in _TRAIN_SECTIONS})


def _shape(stage: Stage, pipe: Pipeline, shapes: dict[str, ModelConfig]
           ) -> ModelConfig | None:
    """The model a stage trains: the last checkpoint it reads (its declared shape, an earlier
    stage's result, or the checkpoint on disk), else its recipe's ``model``; None for a plain
    prune or distill recipe (its checkpoints are given at run time)."""
    if not stage.reads:
        if stage.verb in ("prune", "distill"):
            return None
        return from_dict(ModelConfig, stage.config.get("model"), "model.")
    src = stage.reads[-1]
    if src in shapes:
        return shapes[src]
    if pipe.input_models.get(src):
        return from_dict(ModelConfig, pipe.input_models[src], "model.")
    from nemo_minitron.checkpoint.io import is_checkpoint, load_model_config

    if is_checkpoint(src):
        return load_model_config(src)
    raise ConfigError(f"stage {stage.name}: the shape of {src!r} is unknown; declare it as "
                      "inputs.<name>.model in the pipeline")


def _vocab(m: ModelConfig, recipe: Any) -> int:
    if m.vocab_size:
        return m.vocab_size
    return m.padded_vocab_size(recipe.data.tokenizer_vocab_size)


def search_candidates(stage: Stage, pipe: Pipeline, shapes: dict[str, ModelConfig]
                      ) -> tuple[ModelConfig, list[Candidate]]:
    """A search stage's source (vocabulary sized) and the candidates the search verb will
    enumerate from it; ``shapes``: outputs of earlier stages (from ``validate_pipeline``)."""
    from nemo_minitron.search.enumerate import enumerate_candidates

    recipe = _verb_recipe(stage)
    model = _shape(stage, pipe, shapes)
    if model is None:
        raise ConfigError("a search reads its source checkpoint")
    tp = recipe.parallel.tensor_model_parallel_size
    pp = recipe.parallel.pipeline_model_parallel_size
    model.check_layout(tp, pp)
    src = dataclasses.replace(model, vocab_size=_vocab(model, recipe))
    return src, enumerate_candidates(src, recipe.search, tp, pp)


def validate_pipeline(pipe: Pipeline, cluster_for: Any, gpu_memory_gb: float = 80.0,
                      shapes: dict[str, ModelConfig] | None = None) -> list[StageReport]:
    """Check every stage; ``cluster_for(stage) -> ClusterConfig``. Raises ConfigError.
    ``shapes`` (if given) receives the model each stage produces, by output path."""
    shapes = {} if shapes is None else shapes
    reports = []
    for stage in pipe.stages:
        try:
            reports.append(_check(stage, pipe, cluster_for(stage), shapes, gpu_memory_gb))
        except ConfigError as e:
            raise ConfigError(f"stage {stage.name}: {e}") from None
    return reports


def _check(stage: Stage, pipe: Pipeline, cluster: ClusterConfig,
           shapes: dict[str, ModelConfig], gpu_memory_gb: float) -> StageReport:
    recipe = _verb_recipe(stage)
    model = _shape(stage, pipe, shapes)
    world = cluster.world_size
    tp = recipe.parallel.tensor_model_parallel_size
    pp = recipe.parallel.pipeline_model_parallel_size
    where = f"--nodes {cluster.nodes} x {cluster.ntasks_per_node} processes"
    if world % (tp * pp):
        raise ConfigError(f"{where} = world size {world} is not divisible by "
                          f"tensor_model_parallel_size * pipeline_model_parallel_size = {tp * pp}")
    if model is None:  # a plain prune recipe: only its keys and layout can be checked
        return StageReport(name=stage.name, world_size=world, tp=tp, pp=pp,
                           dp=world // (tp * pp), params=0, memory_gib=None)
    teachers: list[ModelConfig] = []
    if stage.verb == "search":  # sized (and so are later stages) by its largest candidate
        from nemo_minitron.search.enumerate import shape_config

        src, candidates = search_candidates(stage, pipe, shapes)
        teachers = [src]
        model = shape_config(src, max(candidates, key=lambda c: c.params))
        dp = Recipe(model=model, parallel=recipe.parallel, train=recipe.train
                    ).validate_parallel(world)
        result, mb, forward_only = model, recipe.train.micro_batch_size, False
    elif stage.verb == "prune":
        from nemo_minitron.prune.plan import pruned_config, validate_target

        validate_target(model, recipe.target, tp)
        model.check_layout(tp, pp)
        result = pruned_config(model, recipe.target, recipe.rescale_norms)
        dp, mb, forward_only = world // (tp * pp), recipe.calib.micro_batch_size, True
    else:
        dp = dataclasses.replace(recipe, model=model).validate_parallel(world)
        result, mb, forward_only = model, recipe.train.micro_batch_size, False
    shapes[str(stage.output)] = result
    sized = dataclasses.replace(model, vocab_size=_vocab(model, recipe))
    frozen = [dataclasses.replace(shapes[r], vocab_size=_vocab(shapes[r], recipe))
              for r in stage.reads[:-1] if r in shapes]
    frozen += [from_dict(ModelConfig, pipe.input_models[r], "model.")
               for r in stage.reads[:-1] if r not in shapes and pipe.input_models.get(r)]
    frozen += teachers
    mem = None
    if cluster.gpus_per_node:
        mem = memory_gib(sized, tp, pp, dp, mb, forward_only=forward_only, frozen=frozen)
        if mem > gpu_memory_gb:
            raise ConfigError(f"needs about {mem:.1f} GiB per GPU (estimate, see "
                              f"nemo_minitron/model/memory.py) > {gpu_memory_gb:g} GiB with "
                              f"TP={tp} PP={pp} DP={dp} micro batch {mb}: raise TP or PP")
    return StageReport(name=stage.name, world_size=world, tp=tp, pp=pp, dp=dp,
                       params=count_params(sized), memory_gib=mem)


def describe(reports: list[StageReport]) -> list[dict[str, Any]]:
    """Reports as plain dicts (the verb's JSON output)."""
    return [dataclasses.asdict(r) | {"memory_gib": None if r.memory_gib is None
                                      else round(r.memory_gib, 1)} for r in reports]


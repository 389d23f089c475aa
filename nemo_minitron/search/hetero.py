"""``search.mode: heterogeneous`` (Puzzle-style): one block per layer chosen under the
parameter budget from block scores on the parent (``search.blocks``) by the exact solver
(``search.solver``), then pruned to those per-layer shapes (``Target.layer_shapes``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.config.hetero import LayerShape
from nemo_minitron.model.params import count_params, layer_params
from nemo_minitron.search.blocks import LayerLibrary, layer_cost, layer_memory
from nemo_minitron.search.solver import smallest_cost, solve
from nemo_minitron.utils.logging import get_logger

log = get_logger("search")
GIB = 1024**3
"""Bytes per GiB."""


@dataclass
class Budget:
    """What the heterogeneous search may spend: parameters or inference bytes."""

    limit: int
    """The whole model's budget."""
    fixed: int
    """What the parts outside the layers (embedding, output layer, final norm) spend."""
    cost: Callable[[ModelConfig, LayerShape], int]
    """One layer's cost (``search.blocks.layer_cost`` or ``layer_memory``)."""
    name: str
    """The recipe key and value, for messages (``search.target_params=N``)."""
    unit: str
    """``parameters`` or ``bytes``."""


def make_budget(src: ModelConfig, s: Any) -> Budget:
    """The budget of ``SearchConfig`` ``s`` (``search.budget``) for source ``src``."""
    outside = count_params(src) - src.num_layers * layer_params(src)
    if s.budget == "memory":
        m = s.memory
        if m.target_gib is None:
            raise ConfigError("search.budget=memory needs search.memory.target_gib")
        return Budget(int(m.target_gib * GIB), outside * m.bytes_per_param,
                      lambda c, x: layer_memory(c, x, m),
                      f"search.memory.target_gib={m.target_gib}", "bytes")
    if s.target_params is None:
        raise ConfigError("search.target_params must be set (the pruned model's parameters)")
    return Budget(s.target_params, outside, layer_cost,
                  f"search.target_params={s.target_params}", "parameters")


def check_budget(src: ModelConfig, lib: LayerLibrary, b: Budget) -> None:
    """One-line errors for a budget not below the source or below every combination of
    blocks (``lib``'s costs are ``b.cost``'s)."""
    total = b.fixed + src.num_layers * b.cost(src, LayerShape())
    if b.limit >= total:
        raise ConfigError(f"{b.name} is not below the source's {total} {b.unit}")
    low = b.fixed + smallest_cost(lib.costs)
    if b.limit < low:
        raise ConfigError(f"{b.name}: no combination of blocks meets it; the smallest "
                          f"reachable is {low} {b.unit} (every layer's smallest block of "
                          f"search.blocks)")


def choose_shapes(src: ModelConfig, lib: LayerLibrary, b: Budget) -> list[LayerShape]:
    """The per-layer shapes with the least summed score whose model costs at most
    ``b.limit`` (the parts outside the layers included)."""
    check_budget(src, lib, b)
    choice = solve(lib.costs, lib.scores, b.limit - b.fixed, b.unit)
    return [lib.shapes[i][c] for i, c in enumerate(choice)]


def shape_rows(src: ModelConfig, shapes: list[LayerShape]) -> list[dict[str, Any]]:
    """One row per layer for the report: attention (query groups or linear / no-op) and MLP
    (width or linear / no-op), and the layer's parameters."""
    cfg = dataclasses.replace(src, layer_shapes=shapes)
    rows = []
    for i in range(src.num_layers):
        s = cfg.layer_shape(i)
        rows.append({"layer": i, "attention": s.attention, "num_query_groups": s.num_query_groups,
                     "mlp": s.mlp, "ffn_hidden_size": s.ffn_hidden_size,
                     "params": layer_params(cfg, layer=i)})
    return rows


BLOCKS_FILE = "blocks.json"
"""The block scores under ``OUT/search`` (reused by a re-run with the same library)."""
NAME = "heterogeneous"
"""The one candidate's directory name under ``OUT/search/candidates``."""


def block_scores(checkpoint: str, calib: Any, data: Any, src: ModelConfig,
                 options: dict[str, list[Any]], local_distill_steps: int = 0
                 ) -> tuple[dict[str, list[list[float]]], Any]:
    """``(block scores, importance Scores)`` of ``checkpoint`` (one process per model, the
    runtime started): importance, the linear fits and the narrower MLP blocks' local
    distillation (``local_distill_steps``) on ``calib.num_samples`` training sequences of
    ``data``, each block's KL on ``calib.eval_samples`` validation sequences
    (``search.blocks.score_blocks``)."""
    from nemo_minitron.checkpoint.io import load_checkpoint_tokenizer, load_model
    from nemo_minitron.data.datasets import build_gpt_datasets
    from nemo_minitron.data.resolve import resolve_data
    from nemo_minitron.importance.estimator import estimate_importance
    from nemo_minitron.prune.hetero import distill_mlp_blocks, fit_linear_blocks
    from nemo_minitron.prune.stage import calib_sequences
    from nemo_minitron.search.blocks import kept_neurons, score_blocks

    prefix, tok = resolve_data(data, load_checkpoint_tokenizer(checkpoint))
    splits = build_gpt_datasets(prefix, tok, seq_length=calib.seq_length or src.seq_length,
                                split=data.split, seed=data.seed,
                                num_samples=(calib.num_samples, calib.eval_samples, 0))
    tokens = calib_sequences(splits.train, calib.num_samples, "num_samples")[:, :-1]
    valid = calib_sequences(splits.valid, calib.eval_samples, "eval_samples")[:, :-1]
    model, _, _ = load_model(checkpoint)
    importance = estimate_importance(model, tokens, micro_batch_size=calib.micro_batch_size,
                                     batch_agg=calib.batch_agg, seq_agg=calib.seq_agg,
                                     meta={"source": str(checkpoint)})
    linear = fit_linear_blocks(model, tokens, calib.micro_batch_size,
                               [(i, sub) for i in range(src.num_layers) for sub in options
                                if ("linear", None) in options[sub]], src.add_bias_linear)
    cut = {(i, w): (i, kept_neurons(src, importance, i, w)) for i in range(src.num_layers)
           for kind, w in options["mlp"] if kind == "full" and w < src.ffn_hidden_size}
    trained = distill_mlp_blocks(model, src, tokens, calib.micro_batch_size, cut,
                                 local_distill_steps) if local_distill_steps and cut else {}
    return (score_blocks(model, src, importance, options, valid, calib.micro_batch_size,
                         linear, trained), importance)


def _saved_block_scores(checkpoint: str, recipe: Any, src: ModelConfig, root: Any,
                        options: dict[str, list[Any]]) -> dict[str, list[list[float]]]:
    """``block_scores``, saved as ``root/{scores.pt,blocks.json}`` and read back when the
    options are these."""
    from nemo_minitron.utils.fs import atomic_write_json, read_json
    from nemo_minitron.utils.rank import barrier, is_rank0

    scores_file, blocks_file = root / "scores.pt", root / BLOCKS_FILE
    want = [[list(o) for o in options[sub]] for sub in ("attention", "mlp")] + [
        recipe.search.blocks.local_distill_steps]
    if scores_file.is_file() and blocks_file.is_file():
        saved = read_json(blocks_file, "; remove it to score the blocks again")
        if isinstance(saved, dict) and saved.get("options") == want:
            return saved["scores"]
    scores, importance = block_scores(checkpoint, recipe.calib, recipe.data, src, options,
                                      recipe.search.blocks.local_distill_steps)
    if is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        tmp = scores_file.with_name(f".{scores_file.name}.tmp")
        importance.save(str(tmp))
        tmp.replace(scores_file)
        atomic_write_json(blocks_file, {"options": want, "scores": scores,
                                        "library": dataclasses.asdict(recipe.search.blocks)})
    barrier()
    return scores


def _shapes(cfg: ModelConfig) -> list[LayerShape]:
    return [cfg.layer_shape(i) for i in range(cfg.num_layers)]


def hetero_search(checkpoint: str, out: str, recipe: Any) -> dict[str, Any]:
    """``search.mode=heterogeneous`` (``recipe``: a ``SearchRecipe``): block scores on the
    source, the exact choice under the budget (``make_budget``), prune, retrain, report, winner.
    Re-running resumes (the block scores are reused, the retraining resumes)."""
    import shutil

    from nemo_minitron.checkpoint.io import (
        check_checkpoint,
        load_checkpoint_tokenizer,
        load_model_config,
        step_dir,
    )
    from nemo_minitron.data.resolve import check_data
    from nemo_minitron.distill.stage import DistillRecipe, distill
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.prune import result as prune_result
    from nemo_minitron.prune.plan import Target
    from nemo_minitron.prune.stage import PruneRecipe, prune
    from nemo_minitron.search.blocks import layer_library, sublayer_options
    from nemo_minitron.search.hetero_report import write_hetero_report
    from nemo_minitron.search.report import retraining_losses
    from nemo_minitron.search.result import candidate_dir, candidate_run, search_dir, winner_dir
    from nemo_minitron.utils.fs import atomic_dir
    from nemo_minitron.utils.rank import barrier, is_rank0

    s, p = recipe.search, recipe.parallel
    check_checkpoint(checkpoint)
    src = load_model_config(checkpoint)
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if tp != 1 or pp != 1:
        raise ConfigError(f"search.mode=heterogeneous scores its blocks in one process per "
                          f"model: parallel.tensor_model_parallel_size=1 and "
                          f"pipeline_model_parallel_size=1 (got {tp} and {pp}); prune the "
                          f"chosen shapes under TP/PP with prune target.layer_shapes=...")
    if src.is_heterogeneous or src.is_moe:
        raise ConfigError("search.mode=heterogeneous needs a uniform dense source model")
    budget = make_budget(src, s)
    options = sublayer_options(src, s.blocks, tp)
    # Refused before any work: an empty library, a budget no combination of blocks meets.
    check_budget(src, layer_library(src, options, {
        sub: [[0.0] * len(o) for _ in range(src.num_layers)] for sub, o in options.items()},
        budget.cost), budget)
    check_data(recipe.data, load_checkpoint_tokenizer(checkpoint))
    init_distributed(p, seed=recipe.train.seed)
    root = search_dir(out)
    lib = layer_library(src, options, _saved_block_scores(checkpoint, recipe, src, root, options),
                        budget.cost)
    shapes = choose_shapes(src, lib, budget)
    rows = shape_rows(src, shapes)
    for r in rows:
        log.info("layer %d: attention %s%s, mlp %s%s", r["layer"], r["attention"],
                 f" ({r['num_query_groups']} groups)" if r["num_query_groups"] else "",
                 r["mlp"], f" ({r['ffn_hidden_size']})" if r["ffn_hidden_size"] else "")
    pruned, run = candidate_dir(root, NAME) / "pruned", candidate_run(root, NAME)
    want = dataclasses.replace(src, layer_shapes=shapes)
    done = prune_result.read(pruned)
    if done is None or _shapes(load_model_config(pruned)) != _shapes(want) or \
            done.summary.get("local_distill_steps", 0) != s.blocks.local_distill_steps:
        if pruned.exists() and is_rank0():  # cut short, or other shapes: prune again
            shutil.rmtree(pruned)
        barrier()
        prune(checkpoint, str(pruned), PruneRecipe(
            target=Target(layer_shapes=shapes), calib=recipe.calib, data=recipe.data,
            parallel=p, scores=str(root / "scores.pt"), rescale_norms=recipe.rescale_norms,
            local_distill_steps=s.blocks.local_distill_steps))
        barrier()
    train = dataclasses.replace(recipe.train, train_iters=s.retrain_steps)
    kd = DistillRecipe(parallel=p, data=recipe.data, train=train, kd=recipe.kd)
    result = distill(kd, checkpoint, str(pruned), run)
    if result["interrupted"]:
        log.info("stopped at step %d; re-run the same command to resume", result["step"])
        return {"finished": False, "interrupted": True, "remaining": [NAME]}
    params = count_params(want)
    record = {"name": NAME, "params": params, "layers": rows,
              **retraining_losses(result["history"]), "retrain_steps": s.retrain_steps}
    if is_rank0():
        write_hetero_report(root, record, lib, shapes, src, count_params(src),
                            f"{budget.name} ({budget.limit:,} {budget.unit})")
        with atomic_dir(winner_dir(out), overwrite=True) as tmp:
            shutil.copytree(step_dir(run, s.retrain_steps), tmp, dirs_exist_ok=True)
    barrier()
    log.info("heterogeneous: %d params, one-shot loss %.4f, after %d steps %.4f", params,
             record["one_shot_loss"], s.retrain_steps, record["retrained_loss"])
    return {"finished": True, "winner": NAME, "winner_params": params,
            "winner_checkpoint": str(winner_dir(out)), "report": str(root / "report.md")}

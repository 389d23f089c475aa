"""The ``search`` stage: candidate shapes near a budget -> prune each from one importance pass
-> one-shot validation loss -> short distillation -> rank -> report and winner checkpoint.

Layout under ``out``: ``search/scores.pt`` (the shared importance pass),
``search/candidates/<name>/{pruned,distill,result.json}``, ``search/candidates.json`` (all
candidates, rewritten after every finished one), ``search/{report.md,loss_curves.png}`` and
``winner`` (the retrained checkpoint of the best candidate). A re-run of the same command skips
finished candidates and resumes a partly distilled one from its latest checkpoint. Each
candidate's own ``result.json`` is the record of truth, so jobs restricted to different
candidates (``search.candidates``) can share one output directory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_minitron.config import ConfigError, StageRecipe, TrainConfig
from nemo_minitron.distill.objective import KDConfig
from nemo_minitron.prune.stage import CalibConfig
from nemo_minitron.search.enumerate import Candidate, SearchConfig, enumerate_candidates
from nemo_minitron.search.report import retraining_losses
from nemo_minitron.search.result import candidate_dir, candidate_run, search_dir, winner_dir
from nemo_minitron.utils.logging import get_logger
from nemo_minitron.utils.rank import barrier, is_rank0

log = get_logger("search")


def _search_train() -> TrainConfig:
    # The distillation schedule, validated often enough to draw each candidate's curve.
    return TrainConfig(lr=1e-4, min_lr=1e-5, lr_warmup_iters=10, eval_interval=10)


@dataclass(kw_only=True)
class SearchRecipe(StageRecipe):
    """Everything the search verb reads (``data``: calibration, retraining and validation
    data; ``parallel``: the layout of every stage, the candidates are checked against it)."""

    search: SearchConfig = field(default_factory=SearchConfig)
    """Budget, candidate grid, retraining steps, scoring."""
    calib: CalibConfig = field(default_factory=CalibConfig)
    """The importance pass (the one-shot loss is the retraining's step-0 validation)."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Distillation losses of the retraining."""
    train: TrainConfig = field(default_factory=_search_train)
    """Retraining loop; train_iters is search.retrain_steps, eval_interval must be > 0."""
    rescale_norms: bool = True
    """Compensate RMSNorm weights for removed channels (see prune)."""

    def __post_init__(self) -> None:
        if not self.train.eval_interval:
            raise ConfigError("train.eval_interval=0: the search needs validation during "
                              "retraining (set it > 0)")


def load_score_fn(spec: str) -> Callable[[str], float]:
    """``module:function`` -> the function, or a one-line error."""
    from nemo_minitron.utils.imports import load_callable

    return load_callable(spec, "search.score_fn")


def _record(c: Candidate) -> dict[str, Any]:
    shape = {k: v for k, v in dataclasses.asdict(c).items()
             if k not in ("params", "active_params") and v is not None}
    active = {} if c.active_params is None else {"active_params": c.active_params}
    return {"name": c.name, "shape": shape, "params": c.params, **active, "status": "pending"}


def _load_state(path: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Records of an earlier run of the same search, by name."""
    from nemo_minitron.utils.fs import read_json

    if not path.is_file():
        return {}
    # Only a summary: each finished candidate's result.json is the truth, so removing it is safe.
    fix = "; remove it to resume from the candidates' result.json files"
    state = read_json(path, fix)
    rows = state.get("candidates") if isinstance(state, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        raise ConfigError(f"{path} is not a search's candidates.json (no list of named "
                          f"candidates){fix}")
    if [r["name"] for r in state["candidates"]] != names:
        raise ConfigError(f"{path} holds a search over other candidates "
                          f"({[r['name'] for r in state['candidates']]}); use a new output "
                          "directory or the same search settings")
    return {r["name"]: r for r in state["candidates"]}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # checkpoints are never modified in place: hard links are safe
    except OSError:
        shutil.copy2(src, dst)


def stored_result(root: Path, name: str, retrain_steps: int) -> dict[str, Any] | None:
    """A candidate's ``result.json`` under the search's ``root`` (written once it is done).
    A result of another retrain_steps does not count: that candidate is redone, its
    distillation resuming from its last checkpoint."""
    from nemo_minitron.utils.fs import read_json

    f = candidate_dir(root, name) / "result.json"
    r = read_json(f, "; remove it to redo the candidate") if f.is_file() else None
    if r is not None and not isinstance(r, dict):
        raise ConfigError(f"{f} is not a candidate's result (not a JSON object); remove it to "
                          f"redo the candidate")
    return r if r is not None and r.get("retrain_steps") == retrain_steps else None


def candidate_finished(root: Path, name: str, retrain_steps: int) -> bool:
    """Whether a candidate is done for these retrain_steps, its final checkpoint included."""
    from nemo_minitron.checkpoint.io import is_checkpoint, step_dir

    r = stored_result(root, name, retrain_steps)
    final = step_dir(candidate_run(root, name), retrain_steps)
    return r is not None and r.get("status") == "done" and is_checkpoint(final)


def _with_teacher_cache(kd_recipe: Any, checkpoint: str, path: Path, top_k: int) -> Any:
    """``kd_recipe`` reading the teacher's logits from ``path``, built there first if needed."""
    from nemo_minitron.distill.cache_build import build_teacher_cache
    from nemo_minitron.distill.cache_format import META

    kd = dataclasses.replace(kd_recipe.kd, teacher_cache=str(path))  # validates the losses
    if not (path / META).is_file():
        build_teacher_cache(checkpoint, kd_recipe, path, top_k)
    return dataclasses.replace(kd_recipe, kd=kd)


def search(checkpoint: str, out: str, recipe: SearchRecipe) -> dict[str, Any]:
    """Run (or resume) the search; returns the summary (``finished`` False while candidates
    are left: stopped by search.max_candidates_per_run, search.candidates or a signal)."""
    from nemo_minitron.checkpoint.io import (
        check_checkpoint,
        load_checkpoint_tokenizer,
        load_model_config,
        step_dir,
    )
    from nemo_minitron.data.resolve import check_data
    from nemo_minitron.distill.stage import DistillRecipe, distill
    from nemo_minitron.model.params import count_params
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.prune import result as prune_result
    from nemo_minitron.prune.stage import PruneRecipe, prune
    from nemo_minitron.search.report import plot_curves, rank_records, write_report
    from nemo_minitron.utils.fs import atomic_dir, atomic_write_json

    s, p = recipe.search, recipe.parallel
    if s.mode == "heterogeneous":
        from nemo_minitron.search.hetero import hetero_search

        return hetero_search(checkpoint, out, recipe)
    check_checkpoint(checkpoint)
    src = load_model_config(checkpoint)
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    src.check_layout(tp, pp)
    candidates = enumerate_candidates(src, s, tp, pp, p.expert_model_parallel_size)
    score_fn = load_score_fn(s.score_fn) if s.score_fn else None
    if s.candidates is not None:
        unknown = sorted(set(s.candidates) - {c.name for c in candidates})
        if unknown:
            raise ConfigError(f"search.candidates names {unknown[0]!r}, not a candidate of this "
                              f"search ({', '.join(c.name for c in candidates)})")
    root = search_dir(out)
    state_file = root / "candidates.json"
    _load_state(state_file, [c.name for c in candidates])
    records = [_record(c) for c in candidates]

    def stored(name: str) -> dict[str, Any] | None:
        return stored_result(root, name, s.retrain_steps)

    def refresh() -> None:  # per-candidate results are the truth: other jobs may add some
        for i, c in enumerate(candidates):
            records[i] = stored(c.name) or records[i]

    def save_state(rec: dict[str, Any] | None = None) -> None:
        if is_rank0():
            if rec is not None:
                atomic_write_json(candidate_dir(root, rec["name"]) / "result.json", rec)
            rows = [r if r["status"] == "done" else stored(r["name"]) or r for r in records]
            atomic_write_json(state_file, {"source": str(checkpoint),
                                           "target_params": s.target_params,
                                           "tolerance": s.tolerance, "candidates": rows})

    refresh()
    left = [r["name"] for r in records if r["status"] != "done"]
    if s.candidates == [] and left:  # a rank-only run (fan-out's last job) must not pass
        raise ConfigError(f"search.candidates=[] only ranks, and {len(left)} candidates are "
                          f"not finished in {root}: {', '.join(left)}")
    check_data(recipe.data, load_checkpoint_tokenizer(checkpoint))  # before the runtime
    init_distributed(p, seed=recipe.train.seed)
    log.info("%d candidates within %.0f%% of %d %s parameters: %s", len(candidates),
             100 * s.tolerance, s.target_params, s.budget,
             ", ".join(c.name for c in candidates))
    train = dataclasses.replace(recipe.train, train_iters=s.retrain_steps)
    kd_recipe = DistillRecipe(parallel=p, data=recipe.data, train=train, kd=recipe.kd)
    if s.teacher_cache and left and s.candidates != []:  # only when something is distilled
        kd_recipe = _with_teacher_cache(kd_recipe, checkpoint, root / "teacher_cache",
                                        s.teacher_cache_top_k)
    scores_file = root / "scores.pt"
    ran, interrupted = 0, False
    for c, rec in zip(candidates, records):
        pruned, run = candidate_dir(root, c.name) / "pruned", candidate_run(root, c.name)
        final = step_dir(run, s.retrain_steps)
        if candidate_finished(root, c.name, s.retrain_steps):
            log.info("candidate %s: finished earlier, skipped", c.name)
            continue
        if (s.candidates is not None and c.name not in s.candidates) or \
                (s.max_candidates_per_run is not None and ran >= s.max_candidates_per_run):
            continue
        pruned_by = prune_result.read(pruned)
        if pruned_by is None:
            if pruned.exists() and is_rank0():  # cut between the weights and the report
                shutil.rmtree(pruned)
            barrier()
            prune(checkpoint, str(pruned), PruneRecipe(
                target=c.target(s.layer_metric), calib=recipe.calib, data=recipe.data,
                parallel=p, scores=str(scores_file) if scores_file.is_file() else None,
                rescale_norms=recipe.rescale_norms))
            barrier()
            pruned_by = prune_result.read(pruned)
        if not scores_file.is_file() and is_rank0():  # unique temporary: jobs may race here
            tmp = scores_file.with_name(f".{scores_file.name}.{os.getpid()}")
            shutil.copy2(pruned_by.scores, tmp)
            tmp.replace(scores_file)
        barrier()
        result = distill(kd_recipe, checkpoint, str(pruned), run)
        if result["interrupted"]:
            log.info("candidate %s: stopped at step %d; re-run the same command to resume",
                     c.name, result["step"])
            interrupted = True
            break
        rec.update(retraining_losses(result["history"]))
        rec["retrain_steps"] = s.retrain_steps
        rec["checkpoint"] = str(final)
        rec["status"] = "done"
        save_state(rec)
        ran += 1
        log.info("candidate %s (%d params): one-shot loss %.4f, after %d steps %.4f",
                 c.name, c.params, rec["one_shot_loss"], s.retrain_steps, rec["retrained_loss"])
    barrier()
    refresh()
    left = [r["name"] for r in records if r["status"] != "done"]
    if left or s.candidates:  # a job of some candidates leaves the ranking to one writer
        save_state()
        if left:
            log.info("search stopped with %d candidates left (%s); re-run to continue",
                     len(left), ", ".join(left))
        return {"finished": False, "interrupted": interrupted, "remaining": left}
    for rec in records:  # scored once per score function, so a re-run can re-rank cheaply
        if "score" not in rec or rec.get("scored_by") != s.score_fn:
            rec["score"] = float(score_fn(rec["checkpoint"])) if score_fn \
                else rec["retrained_loss"]
            rec["scored_by"] = s.score_fn
            save_state(rec)
    rho = rank_records(records)
    save_state()
    best = min(records, key=lambda r: (r["rank_retrained"], r["name"]))
    if is_rank0():
        write_report(root, records, rho, count_params(src), s.target_params, s.score_fn,
                     s.budget, count_params(src, active=True) if src.is_moe else None)
        plot_curves(records, root / "loss_curves.png")
        with atomic_dir(winner_dir(out), overwrite=True) as tmp:
            shutil.copytree(best["checkpoint"], tmp, dirs_exist_ok=True,
                            copy_function=_link_or_copy)
    barrier()
    log.info("winner %s (%d params, loss %.4f); Spearman(one-shot, retrained) = %s",
             best["name"], best["params"], best["retrained_loss"],
             "n/a" if rho is None else f"{rho:.3f}")
    return {"finished": True, "winner": best["name"], "winner_params": best["params"],
            "winner_checkpoint": str(winner_dir(out)), "spearman": rho,
            "report": str(root / "report.md")}

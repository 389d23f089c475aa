"""The ``launch`` and ``validate`` verbs: a recipe (one verb) or a pipeline (``stages:``) as
SLURM jobs chained by ``afterok`` dependencies, or run here with torchrun."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nemo_minitron.config import ConfigError, ModelConfig, from_dict, load_yaml, recipe_path
from nemo_minitron.launch.fanout import fans_out
from nemo_minitron.launch.pipeline import Pipeline, Stage, load_pipeline, single_stage
from nemo_minitron.launch.sbatch import ClusterConfig, job_command, render_sbatch
from nemo_minitron.utils.logging import get_logger

log = get_logger("launch")

CLUSTER_FLAGS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "partition",
                 "account", "time", "container_image", "container_mounts", "job_name",
                 "signal_seconds")


def load(recipe: str, overrides: list[str], out: str | None = None) -> Pipeline:
    """A pipeline file, or a plain recipe as a one-stage pipeline (``prune`` when it has a
    ``target:`` section, ``distill`` with a ``kd:`` section, else ``pretrain``)."""
    recipe = str(recipe_path(recipe))
    data = load_yaml(recipe)
    if "stages" in data:
        return load_pipeline(recipe, overrides)
    if "study" in data:
        raise ConfigError(f"{recipe} is a bench-method recipe: run `nemo-minitron bench-method "
                          f"{recipe}` (a one-process benchmark, not a cluster job)")
    for section, verb in (("sft", "sft"), ("merge", "merge")):
        if section in data:  # these verbs take input paths a plain recipe cannot name
            raise ConfigError(f"{recipe} is a {verb} recipe: `nemo-minitron {verb}` takes input "
                              f"paths, so launch it as a stage of a pipeline (stages: - verb: "
                              f"{verb}, args: [...], recipe: {Path(recipe).name})")
    verb = "prune" if "target" in data else "distill" if "kd" in data else "pretrain"
    return single_stage(recipe, verb, overrides, out or f"runs/{Path(recipe).stem}")


def cluster_resolver(pipe: Pipeline, flags: dict[str, Any]) -> Callable[[Stage], ClusterConfig]:
    """Resources of a stage: CLI flags > the stage's ``cluster:`` > the pipeline's."""
    given = {k: v for k, v in flags.items() if v is not None}

    def resolve(stage: Stage) -> ClusterConfig:
        merged = {**pipe.cluster, **stage.cluster, **given}
        merged.setdefault("job_name", stage.name)
        return from_dict(ClusterConfig, merged, "cluster.")
    return resolve


def complete(stage: Stage) -> bool:
    """Whether the stage's output checkpoint exists and is complete."""
    from nemo_minitron.checkpoint.io import is_checkpoint

    return is_checkpoint(stage.output)


def launch_slurm(pipe: Pipeline, cluster_for: Callable[[Stage], ClusterConfig],
                 dry_run: bool, shapes: dict[str, ModelConfig] | None = None
                 ) -> list[dict[str, Any]]:
    """Submit every stage whose output is missing, each after the stages it reads (a search
    with ``search.fan_out`` as several jobs, see ``launch/fanout.py``); ``shapes``: the model
    each stage produces, by output path, from ``validate_pipeline``."""
    from nemo_minitron.launch import slurm
    from nemo_minitron.launch.fanout import pipeline_jobs

    todo = [s for s in pipe.stages if not complete(s)]
    for s in pipe.stages:
        if s not in todo:
            log.info("stage %s: %s is complete; not submitted", s.name, s.output)
    planned = pipeline_jobs(pipe, todo, cluster_for, shapes or {})
    if not dry_run:
        slurm.preflight([j.cluster for j in planned])
    jobs: dict[str, str] = {}
    result = []
    for job in planned:
        c, logs = job.cluster, job.stage.out / "logs"
        cmd = job_command(job.stage.verb, job.argv, container=bool(c.container_image))
        script = render_sbatch(c, cmd, logs)
        waits = [n for n in job.needs if n in jobs]
        if dry_run:
            dep = f" --dependency=afterok:<job of {', '.join(waits)}>" if waits else ""
            print(f"# ---- stage {job.name}: sbatch{dep} {logs}/{c.job_name}.sbatch")
            print(script)
            jobs[job.name] = f"<{job.name}>"
            continue
        after = [jobs[n] for n in waits]
        jobs[job.name] = slurm.submit(script, logs / f"{c.job_name}.sbatch", after)
        log.info("stage %s: submitted job %s%s", job.name, jobs[job.name],
                 f" after {', '.join(after)}" if after else "")
        result.append({"stage": job.name, "job_id": jobs[job.name],
                       "log": str(logs / f"{c.job_name}-{jobs[job.name]}.out"),
                       "output": str(job.output)})
    return result


def launch_local(pipe: Pipeline, cluster_for: Callable[[Stage], ClusterConfig]) -> int:
    """Run the missing stages here, one after another (torchrun for more than one process)."""
    for stage in pipe.stages:
        if complete(stage):
            log.info("stage %s: %s is complete; skipped", stage.name, stage.output)
            continue
        if fans_out(stage):
            log.info("stage %s: search.fan_out is for SLURM; here the search runs as one "
                     "process, candidate after candidate", stage.name)
        c = cluster_for(stage)
        if c.nodes != 1:
            raise ConfigError(f"--cluster local runs on one node, not --nodes {c.nodes}")
        n = c.ntasks_per_node
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={n}"] if n > 1 else [sys.executable]
        argv = [*head, "-m", "nemo_minitron", stage.verb, *stage.argv]
        log.info("stage %s: %s", stage.name, " ".join(argv))
        rc = subprocess.run(argv).returncode
        if rc:
            log.error("stage %s failed with status %d", stage.name, rc)
            return rc
    return 0


def run_launch(recipe: str, overrides: list[str], *, cluster: str, out: str | None,
               flags: dict[str, Any], dry_run: bool) -> int:
    """The ``launch`` verb: validate every stage, then submit (or print, or run here)."""
    from nemo_minitron.launch.validate import validate_pipeline

    pipe = load(recipe, overrides, out)
    if pipe.stages[0].verb in ("prune", "distill") and not pipe.stages[0].reads:
        raise ConfigError(f"{recipe}: a {pipe.stages[0].verb} recipe needs its input "
                          "checkpoints; launch it as a stage of a pipeline recipe (stages:)")
    if cluster == "local" and flags.get("gpus_per_node") is None:
        import torch

        flags = {**flags, "gpus_per_node": torch.cuda.device_count()}
    cluster_for = cluster_resolver(pipe, flags)
    shapes: dict[str, ModelConfig] = {}
    validate_pipeline(pipe, cluster_for, shapes=shapes)
    if cluster == "local":
        return launch_local(pipe, cluster_for)
    jobs = launch_slurm(pipe, cluster_for, dry_run, shapes)
    if not dry_run:
        import json

        print(json.dumps(jobs))
    return 0


def run_validate(recipe: str, overrides: list[str], *, flags: dict[str, Any],
                 gpu_memory_gb: float) -> list[dict[str, Any]]:
    """The ``validate`` verb: every stage's layout and memory estimate, or a ConfigError."""
    from nemo_minitron.launch.validate import describe, validate_pipeline

    pipe = load(recipe, overrides)
    return describe(validate_pipeline(pipe, cluster_resolver(pipe, flags), gpu_memory_gb))


"""The ``launch`` and ``validate`` verbs: a recipe (one verb) or a pipeline (``stages:``) as
SLURM jobs chained by ``afterok`` dependencies, or run here with torchrun."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nemo_minitron.config import ConfigError, ModelConfig, from_dict, load_yaml, recipe_path
from nemo_minitron.launch.fanout import Job, fans_out
from nemo_minitron.launch.pipeline import Pipeline, Stage, load_pipeline, single_stage
from nemo_minitron.launch.sbatch import ClusterConfig, job_command, render_sbatch
from nemo_minitron.utils.logging import get_logger

log = get_logger("launch")

CLUSTER_FLAGS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "partition",
                 "account", "time", "container_image", "container_mounts", "job_name",
                 "signal_seconds")


def load(recipe: str, overrides: list[str], out: str | None = None) -> Pipeline:
    """A pipeline file, or a plain pretraining recipe as a one-stage pipeline (the recipes of
    verbs that read checkpoints are refused with the verb to run them with)."""
    recipe = str(recipe_path(recipe))
    data = load_yaml(recipe)
    if "stages" in data:
        return load_pipeline(recipe, overrides)
    if "study" in data:
        raise ConfigError(f"{recipe} is a bench-method recipe: run `nemo-minitron bench-method "
                          f"{recipe}` (a one-process benchmark, not a cluster job)")
    for section, verb in (("sft", "sft"), ("merge", "merge"), ("target", "prune"),
                          ("kd", "distill")):
        if section in data:  # these verbs take input paths a plain recipe cannot name
            raise ConfigError(f"{recipe} is a {verb} recipe: `nemo-minitron {verb}` takes input "
                              f"paths, so run it with that verb or launch it as a stage of a "
                              f"pipeline (stages: - verb: {verb}, args: [...], recipe: "
                              f"{Path(recipe).name})")
    return single_stage(recipe, "pretrain", overrides, out or f"runs/{Path(recipe).stem}")


def cluster_resolver(pipe: Pipeline, flags: dict[str, Any]) -> Callable[[Stage], ClusterConfig]:
    """Resources of a stage: CLI flags > the stage's ``cluster:`` > the pipeline's > the
    ``cluster:`` section of the stage's recipe file."""
    given = {k: v for k, v in flags.items() if v is not None}

    def resolve(stage: Stage) -> ClusterConfig:
        merged = {**stage.recipe_cluster, **pipe.cluster, **stage.cluster, **given}
        merged.setdefault("job_name", stage.name)
        return from_dict(ClusterConfig, merged, "cluster.")
    return resolve


def complete(stage: Stage) -> bool:
    """Whether the stage's output checkpoint exists and is complete."""
    from nemo_minitron.checkpoint.io import is_checkpoint

    return is_checkpoint(stage.output)


def _job_paths(stage: Stage) -> list[Path]:
    """What a stage's job reads and writes (mounted into a container): its directory and
    every absolute path among its arguments (recipe, checkpoints)."""
    return [stage.out, *(Path(a) for a in stage.argv if a.startswith("/"))]


def launch_slurm(pipe: Pipeline, cluster_for: Callable[[Stage], ClusterConfig],
                 dry_run: bool, shapes: dict[str, ModelConfig] | None = None
                 ) -> list[dict[str, Any]]:
    """Submit every stage whose output is missing, each after the stages it reads (a search
    with ``search.fan_out`` as several jobs, see ``launch/fanout.py``); ``shapes``: the model
    each stage produces, by output path, from ``validate_pipeline``. A job that an earlier
    launch submitted and that is still queued or running is not submitted again (its id is
    recorded beside the stage's logs and asked of the scheduler); the jobs after it wait for
    it. Launches of one pipeline take turns (a lock file)."""
    from nemo_minitron.launch import slurm
    from nemo_minitron.launch.fanout import pipeline_jobs

    todo = [s for s in pipe.stages if not complete(s)]
    for s in pipe.stages:
        if s not in todo:
            log.info("stage %s: %s is complete; not submitted", s.name, s.output)
    planned = pipeline_jobs(pipe, todo, cluster_for, shapes or {})
    if dry_run:
        jobs: dict[str, str] = {}
        for job in planned:
            waits = [n for n in job.needs if n in jobs]
            dep = f" --dependency=afterok:<job of {', '.join(waits)}>" if waits else ""
            print(f"# ---- stage {job.name}: sbatch{dep} "
                  f"{job.stage.logs}/{job.cluster.job_name}.sbatch")
            print(_script(job))
            jobs[job.name] = f"<{job.name}>"
        return []
    slurm.preflight([j.cluster for j in planned])
    with slurm.launch_lock(pipe.logs):
        return _submit(planned)


def _script(job: Job) -> str:
    c = job.cluster
    cmd = job_command(job.stage.verb, job.argv, container=bool(c.container_image))
    return render_sbatch(c, cmd, job.stage.logs, paths=_job_paths(job.stage))


def _submit(planned: list[Job]) -> list[dict[str, Any]]:
    from nemo_minitron.launch import slurm

    jobs: dict[str, str] = {}
    fresh: set[str] = set()  # submitted by this launch
    result = []
    for job in planned:
        logs, name = job.stage.logs, job.cluster.job_name
        held = slurm.holder(logs, job.name)
        if held is not None and fresh & set(job.needs):
            # It waits for a job that is gone (its stage is submitted anew): it never starts.
            log.info("stage %s: job %s waits for a job that was replaced; replacing it too",
                     job.name, held[0])
            slurm.cancel(held[0])
            held = None
        if held is not None:
            jobs[job.name] = held[0]
            log.info("stage %s: job %s (%s) already holds it; not submitted again",
                     job.name, *held)
            result.append({"stage": job.name, "job_id": held[0], "submitted": False,
                           "state": held[1], "output": str(job.output)})
            continue
        after = [jobs[n] for n in job.needs if n in jobs]
        jobs[job.name] = slurm.submit(_script(job), logs / f"{name}.sbatch", after,
                                      slurm.record_path(logs, job.name))
        fresh.add(job.name)
        log.info("stage %s: submitted job %s%s", job.name, jobs[job.name],
                 f" after {', '.join(after)}" if after else "")
        result.append({"stage": job.name, "job_id": jobs[job.name], "submitted": True,
                       "log": str(logs / f"{name}-{jobs[job.name]}.out"),
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


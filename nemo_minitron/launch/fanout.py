"""The SLURM jobs of a pipeline: one per stage, except a search stage with ``search.fan_out``,
which becomes one job per candidate plus a ranking job after them.

Candidate job ``<job name>-<candidate>`` runs the stage's command with
``search.candidates=[<candidate>]``; the ranking job keeps the stage's name (so later stages
reading ``{stages.<search>.output}`` wait for it), runs ``search.candidates=[]`` (rank only: a
one-line error while a candidate is unfinished) and depends (afterok) on every candidate job.
All of them share the stage's directory; each candidate job writes only its own
``search/candidates/<name>/``. Candidates whose ``result.json`` says done, for the same
``retrain_steps``, with the final checkpoint present, are not submitted again.

The shared importance pass (``search/scores.pt``): a candidate job that finds it reuses it;
otherwise each candidate job computes it and the first to finish publishes it (the search
renames a unique temporary, so racing jobs are safe and, the pass being deterministic, write
the same scores). We do not make the other candidates wait for the first: SLURM dependencies
are per job, so they would wait for its whole retraining, doubling the wall time, while the pass
is forward-only over ``calib.num_samples`` sequences, small next to ``retrain_steps`` steps of
distillation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nemo_minitron.config import ConfigError, ModelConfig, from_dict
from nemo_minitron.launch.pipeline import Pipeline, Stage
from nemo_minitron.launch.sbatch import ClusterConfig
from nemo_minitron.search.result import candidate_run, search_dir


@dataclass
class Job:
    """One SLURM job: a whole stage, or part of a fanned-out search stage."""

    name: str
    """Unique among the pipeline's jobs; a stage's name for the job that produces its output."""
    stage: Stage
    """The stage it belongs to (its directory holds the logs)."""
    argv: list[str]
    """Arguments after the verb."""
    cluster: ClusterConfig
    """Resources (and job name)."""
    needs: list[str]
    """Jobs (names) it starts after; those not submitted in this launch are ignored."""
    output: Path
    """What it produces."""


def fans_out(stage: Stage) -> bool:
    """Whether the stage is a search with ``search.fan_out: true``."""
    from nemo_minitron.search.stage import SearchRecipe

    return stage.verb == "search" and from_dict(SearchRecipe, stage.config).search.fan_out


def _with_override(argv: list[str], override: str) -> list[str]:
    """``argv`` plus one last ``key=value`` (it wins over earlier ones), before any ``--out``."""
    if len(argv) >= 2 and argv[-2] == "--out":
        return [*argv[:-2], override, *argv[-2:]]
    return [*argv, override]


def candidate_done(stage: Stage, name: str, retrain_steps: int) -> bool:
    """Whether a candidate of a search stage finished with these retrain_steps."""
    from nemo_minitron.search.stage import candidate_finished

    return candidate_finished(search_dir(stage.out), name, retrain_steps)


def expand_search(stage: Stage, pipe: Pipeline, cluster: ClusterConfig,
                  shapes: dict[str, ModelConfig]) -> list[Job]:
    """The candidate jobs of a search stage still to run, then its ranking job."""
    from nemo_minitron.launch.validate import search_candidates
    from nemo_minitron.search.stage import SearchRecipe

    s = from_dict(SearchRecipe, stage.config).search
    if s.candidates is not None:
        raise ConfigError(f"stage {stage.name}: search.fan_out submits every candidate; drop "
                          "search.candidates")
    steps = s.retrain_steps
    _, candidates = search_candidates(stage, pipe, shapes)
    jobs = []
    from nemo_minitron.checkpoint.io import step_dir

    for c in candidates:
        if candidate_done(stage, c.name, steps):
            continue
        run = candidate_run(search_dir(stage.out), c.name)
        jobs.append(Job(name=f"{stage.name}-{c.name}", stage=stage,
                        argv=_with_override(stage.argv, f"search.candidates=[{c.name}]"),
                        cluster=dataclasses.replace(cluster, job_name=f"{cluster.job_name}-"
                                                                      f"{c.name}"),
                        needs=stage.needs, output=step_dir(run, steps)))
    rank = Job(name=stage.name, stage=stage,
               argv=_with_override(stage.argv, "search.candidates=[]"), cluster=cluster,
               needs=[*stage.needs, *(j.name for j in jobs)], output=stage.output)
    return [*jobs, rank]


def pipeline_jobs(pipe: Pipeline, stages: list[Stage],
                  cluster_for: Callable[[Stage], ClusterConfig],
                  shapes: dict[str, ModelConfig]) -> list[Job]:
    """The jobs of ``stages`` (those to run) in submission order; ``shapes``: the model each
    stage produces, by output path (filled by ``validate_pipeline``)."""
    jobs: list[Job] = []
    for s in stages:
        if fans_out(s):
            jobs += expand_search(s, pipe, cluster_for(s), shapes)
        else:
            jobs.append(Job(name=s.name, stage=s, argv=s.argv, cluster=cluster_for(s),
                            needs=s.needs, output=s.output))
    names = [j.name for j in jobs]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"two jobs are named {n!r} (a stage and a search candidate's "
                              "job): rename the stage")
    return jobs

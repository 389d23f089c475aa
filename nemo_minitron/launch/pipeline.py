"""Pipelines: a recipe file with ``stages:``, each stage one verb run (one SLURM job).

A stage is (verb, args, output dir): ``nemo-minitron <verb> <args...> [recipe] <config as
key=value...> [--out <out>]``. Strings may reference ``{vars.NAME}``, ``{inputs.NAME}`` (an
existing checkpoint), ``{stages.NAME.output}`` (an earlier stage's checkpoint) and ``{out}``
(this stage's directory, ``<workdir>/<name>``); ``--out {out}`` is appended when ``{out}`` is
not among the args. What the launcher knows about a verb comes from the registry
(``nemo_minitron.verbs``), so a new verb plugs in with its entry there. A stage's output
checkpoint is the verb's ``Verb.output`` of ``<out>``: ``<out>`` itself for the verbs that write
one checkpoint directory (``prune``, ``merge``, the importers), the winner for ``search``, and
the final training checkpoint ``<out>/checkpoints/step_<train.train_iters>`` for every other
verb; a stage whose output is a complete checkpoint is not run again.

The launcher's own files for a stage (its job script, SLURM log and the record of the job that
holds it) live in ``<workdir>/logs/<stage>/``, outside the stage's directory: verbs such as
``prune`` refuse an output directory that exists. A recipe's ``cluster:`` section (resources
when launched; the verb itself ignores it) is the stage's default, below the pipeline's.

A plain verb recipe (no ``stages:``) is a one-stage pipeline running ``--verb`` on it; its
launcher files are in ``<out>/logs/`` (the training verbs it runs resume in an existing
directory).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nemo_minitron import verbs
from nemo_minitron.config import ConfigError, TrainConfig, load_yaml, merge, parse_overrides

LOGS = "logs"
"""The directory under a pipeline's workdir holding each stage's launcher files."""
_REF = re.compile(r"\{(out|vars\.[\w-]+|inputs\.[\w-]+|stages\.[\w-]+\.output)\}")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_TOP = {"workdir", "vars", "inputs", "cluster", "stages"}
_STAGE = {"name", "verb", "args", "recipe", "config", "cluster"}


@dataclass
class Stage:
    """One resolved stage."""

    name: str
    """Stage name (also its directory under the workdir and its job name)."""
    verb: str
    """The nemo-minitron verb it runs."""
    argv: list[str]
    """Arguments after the verb, references resolved."""
    config: dict[str, Any]
    """The verb's recipe: the recipe file merged with the stage's config and overrides."""
    out: Path
    """The stage's directory."""
    output: Path
    """The checkpoint the stage produces."""
    needs: list[str]
    """Earlier stages it reads."""
    reads: list[str]
    """Checkpoints it reads, in argument order (the last one is the model it trains)."""
    logs: Path
    """The launcher's files for this stage: job script, SLURM log, job record."""
    cluster: dict[str, Any] = field(default_factory=dict)
    """Resource overrides of this stage."""
    recipe_cluster: dict[str, Any] = field(default_factory=dict)
    """The ``cluster:`` section of its recipe file (below the pipeline's)."""


@dataclass
class Pipeline:
    """Resolved stages in run order plus what validation needs about external inputs."""

    stages: list[Stage]
    """Stages in order."""
    cluster: dict[str, Any]
    """Pipeline-wide resource defaults."""
    input_models: dict[str, dict[str, Any]]
    """Declared model shape of each external input checkpoint, by path."""
    logs: Path
    """The launcher's directory (``<workdir>/logs``; ``<out>/logs`` for a plain recipe)."""


def flatten(config: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"train": {"lr": 1e-4}}`` -> ``["train.lr=0.0001"]``; values written as YAML that
    ``parse_overrides`` reads back to the same value (JSON for anything non-plain)."""
    out: list[str] = []
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out += flatten(value, f"{prefix}{key}.")
        elif isinstance(value, str) and yaml.safe_load(value) == value and value.strip():
            out.append(f"{prefix}{key}={value}")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def _output(name: str, out: Path, config: dict[str, Any]) -> Path:
    output = verbs.BY_NAME[name].output
    if output is not None:
        return output(out)
    from nemo_minitron.checkpoint.io import step_dir

    iters = config.get("train", {}).get("train_iters", TrainConfig().train_iters)
    return step_dir(out, iters)


def check_overrides(overrides: list[str]) -> None:
    """Refuse control characters in override values: a newline would end a line of the job
    script or of a ``#SBATCH`` header."""
    for o in overrides:
        if any(ch in o for ch in "\n\r\0"):
            raise ConfigError(f"override {o.split('=', 1)[0]!r} holds a newline or control "
                              "character, which a job script cannot carry")


def single_stage(recipe: str, verb: str, overrides: list[str], out: str) -> Pipeline:
    """A plain verb recipe as a one-stage pipeline (the overrides are passed through)."""
    check_overrides(overrides)
    config = merge(load_yaml(recipe), parse_overrides(overrides))
    cluster = _pop_cluster(config, recipe)
    o = Path(out).absolute()
    argv = [str(Path(recipe).absolute()), *overrides, "--out", str(o)]
    stage = Stage(name=o.name, verb=verb, argv=argv, config=config, out=o,
                  output=_output(verb, o, config), needs=[], reads=[], logs=o / LOGS)
    return Pipeline(stages=[stage], cluster=cluster, input_models={}, logs=stage.logs)


def _pop_cluster(config: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """Remove and return a recipe's ``cluster:`` section (launch reads it, the verb ignores
    it)."""
    cluster = config.pop("cluster", None) or {}
    if not isinstance(cluster, dict):
        raise ConfigError(f"{where}: cluster must be a mapping of job resources")
    return cluster


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Read a pipeline file; overrides: ``workdir=``, ``vars.X=``, ``inputs.X.path=``,
    ``cluster.K=``, or ``<stage>.<recipe key>=`` (into that stage's config)."""
    check_overrides(overrides or [])
    base = Path(path).absolute().parent
    data = load_yaml(path)
    unknown = set(data) - _TOP
    if unknown:
        raise ConfigError(f"unknown pipeline key '{sorted(unknown)[0]}' (known: "
                          f"{', '.join(sorted(_TOP))})")
    raw = data.get("stages")
    if not isinstance(raw, list) or not raw:
        raise ConfigError("stages must be a non-empty list")
    names = [s.get("name") if isinstance(s, dict) else None for s in raw]
    for key, value in parse_overrides(overrides or []).items():
        if key in _TOP - {"stages"}:
            data[key] = merge(data.get(key) or {}, value) if isinstance(value, dict) else value
        elif key in names and isinstance(value, dict):
            s = raw[names.index(key)]
            s["config"] = merge(s.get("config") or {}, value)
        else:
            raise ConfigError(f"override '{key}...' names neither a pipeline key "
                              f"({', '.join(sorted(_TOP - {'stages'}))}) nor a stage "
                              f"({', '.join(map(str, names))})")
    workdir = Path(str(data.get("workdir") or "runs/pipeline")).absolute()
    refs: dict[str, str] = {f"vars.{k}": str(v) for k, v in (data.get("vars") or {}).items()}
    input_models: dict[str, dict[str, Any]] = {}
    for k, v in (data.get("inputs") or {}).items():
        spec = v if isinstance(v, dict) else {"path": v}
        if not spec.get("path"):
            raise ConfigError(f"inputs.{k}.path must name a checkpoint")
        p = str(Path(str(spec["path"])).absolute())
        refs[f"inputs.{k}"] = p
        input_models[p] = spec.get("model") or {}
    stages: list[Stage] = []
    for i, s in enumerate(raw):
        stages.append(_stage(s, i, base, workdir, refs, stages))
        refs[f"stages.{stages[-1].name}.output"] = str(stages[-1].output)
    return Pipeline(stages=stages, cluster=data.get("cluster") or {}, input_models=input_models,
                    logs=workdir / LOGS)


def _stage(s: Any, i: int, base: Path, workdir: Path, refs: dict[str, str],
           done: list[Stage]) -> Stage:
    if not isinstance(s, dict) or set(s) - _STAGE or not s.get("name") or not s.get("verb"):
        raise ConfigError(f"stages[{i}] must be a mapping with name and verb (keys: "
                          f"{', '.join(sorted(_STAGE))})")
    name, verb = str(s["name"]), verbs.verb(str(s["verb"]), f"stages[{i}]").name
    if not _NAME.match(name) or any(d.name == name for d in done):
        raise ConfigError(f"stages[{i}].name={name!r} must be unique and use only "
                          "letters, digits, _ and -")
    if name == LOGS:
        raise ConfigError(f"stages[{i}].name={name!r} is reserved: <workdir>/{LOGS}/ holds "
                          "the stages' job scripts and logs")
    out = workdir / name
    local = {**refs, "out": str(out)}
    needs: list[str] = []
    reads: list[str] = []

    def sub(text: str, where: str, is_arg: bool = False) -> str:
        def one(m: re.Match[str]) -> str:
            key = m.group(1)
            if key not in local:
                raise ConfigError(f"{where} references {{{key}}}, which is not defined "
                                  "(or is a later stage)")
            if key.startswith("stages."):
                needs.append(key.split(".")[1])
            if is_arg and key.startswith(("stages.", "inputs.")):
                reads.append(local[key])
            return local[key]
        return _REF.sub(one, text)

    def sub_all(v: Any, where: str) -> Any:
        if isinstance(v, dict):
            return {k: sub_all(x, f"{where}.{k}") for k, x in v.items()}
        if isinstance(v, list):
            return [sub_all(x, f"{where}[{j}]") for j, x in enumerate(v)]
        return sub(v, where) if isinstance(v, str) else v

    where = f"stages.{name}"
    args = [sub(str(a), f"{where}.args", is_arg=True) for a in (s.get("args") or [])]
    own = sub_all(s.get("config") or {}, f"{where}.config")
    if not isinstance(own, dict):
        raise ConfigError(f"{where}.config must be a mapping of recipe sections")
    config, recipe, recipe_cluster = own, None, {}
    if s.get("recipe"):
        recipe = (base / str(s["recipe"])).resolve()
        config = merge(load_yaml(recipe), own)
        recipe_cluster = _pop_cluster(config, recipe)
    argv = args + ([str(recipe)] if recipe else []) + flatten(own)
    if not any("{out}" in str(a) for a in (s.get("args") or [])):
        argv += ["--out", str(out)]
    return Stage(name=name, verb=verb, argv=argv, config=config, out=out,
                 output=_output(verb, out, config), needs=list(dict.fromkeys(needs)),
                 reads=reads, logs=workdir / LOGS / name, cluster=s.get("cluster") or {},
                 recipe_cluster=recipe_cluster)

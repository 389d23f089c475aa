"""A search stage with ``search.fan_out``: one job per candidate and a ranking job after them
(the job list and the dry-run scripts, here), and on the local SLURM cluster the same ranking
and winner as the search run in one process."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from nemo_minitron.config import ConfigError, load_recipe, parse_overrides
from nemo_minitron.launch.fanout import pipeline_jobs
from nemo_minitron.launch.pipeline import load_pipeline
from nemo_minitron.launch.run import cluster_resolver
from nemo_minitron.launch.validate import validate_pipeline
from nemo_minitron.search.stage import SearchRecipe, search
from tests.cli import run_cli
from tests.helpers.launch import _args, _cli, _dry, _fake_checkpoint, _words

SRC = {"num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
       "num_query_groups": 2, "seq_length": 64, "vocab_size": 1024}
# Three candidates within 1% of 205,200 parameters (see tests/search/test_search.py), in the
# order the search enumerates them (closest to the budget first).
ORDER = ["L3-H64-F64-A4-G2", "L2-H64-F128-A4-G2", "L4-H64-F64-A2-G1"]


def _pipeline(tmp_path: Path, source: str, config: dict, model: dict | None = None) -> Path:
    inputs = {"teacher": {"path": source, **({"model": model} if model else {})}}
    data = {"workdir": str(tmp_path / "w"), "inputs": inputs,
            "cluster": {"gpus_per_node": 0, "cpus_per_task": 1},
            "stages": [{"name": "search", "verb": "search",
                        "args": ["{inputs.teacher}", "{out}"], "config": config},
                       {"name": "heal", "verb": "distill",
                        "args": ["{inputs.teacher}", "{stages.search.output}"],
                        "config": {"train": {"micro_batch_size": 4, "global_batch_size": 8,
                                             "train_iters": 2}}}]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _config(overrides: list[str]) -> dict:
    return parse_overrides(overrides + ["search.fan_out=true"])


FAST = ["search.target_params=205200", "search.tolerance=0.01", "search.retrain_steps=3",
        "train.micro_batch_size=4", "train.global_batch_size=8"]


def test_expansion_jobs_dependencies_and_dry_run(tmp_path):
    path = _pipeline(tmp_path, "/nonexistent/teacher", _config(FAST), SRC)
    pipe = load_pipeline(path)
    cluster_for = cluster_resolver(pipe, {})
    shapes: dict = {}
    validate_pipeline(pipe, cluster_for, shapes=shapes)
    jobs = pipeline_jobs(pipe, pipe.stages, cluster_for, shapes)
    out = tmp_path / "w" / "search"
    assert [j.name for j in jobs] == [f"search-{n}" for n in ORDER] + ["search", "heal"]
    assert [j.cluster.job_name for j in jobs[:4]] == [j.name for j in jobs[:4]]
    for j, name in zip(jobs, ORDER):
        assert j.argv[:2] == ["/nonexistent/teacher", str(out)]
        assert j.argv[-1] == f"search.candidates=[{name}]" and j.needs == []
        assert j.output == out / f"search/candidates/{name}/distill/checkpoints/step_0000003"
    assert jobs[3].argv[-1] == "search.candidates=[]"
    assert jobs[3].needs == [f"search-{n}" for n in ORDER]
    assert jobs[3].output == out / "winner" and jobs[4].needs == ["search"]

    # The dry run prints every job's script, each after the jobs it needs.
    r = _dry("launch", str(path), "--dry-run")
    assert r.returncode == 0, r.stderr
    heads = [x for x in r.stdout.splitlines() if x.startswith("# ---- stage")]
    assert [h.split()[3].rstrip(":") for h in heads] == [j.name for j in jobs]
    assert all("afterok" not in h for h in heads[:3])
    assert f"--dependency=afterok:<job of {', '.join(f'search-{n}' for n in ORDER)}>" \
        in heads[3] and "afterok:<job of search>" in heads[4]
    scripts = r.stdout.split("# ---- stage")[1:]
    for script, name in zip(scripts, ORDER):
        words = _words(script)
        assert words[3:6] == ["search", "/nonexistent/teacher", str(out)]
        assert words[-1] == f"search.candidates=[{name}]" and "search.fan_out=true" in words
        assert f"#SBATCH --job-name=search-{name}\n" in script
    assert _words(scripts[3])[-1] == "search.candidates=[]"
    assert not (tmp_path / "w").exists()

    # A finished candidate (same retrain_steps) is not submitted again; another's is.
    for name, steps in ((ORDER[0], 3), (ORDER[1], 2)):
        cdir = out / "search" / "candidates" / name
        _fake_checkpoint(cdir / "distill" / "checkpoints" / f"step_{steps:07d}")
        (cdir / "result.json").write_text(json.dumps({"status": "done",
                                                      "retrain_steps": steps}))
    jobs = pipeline_jobs(pipe, pipe.stages, cluster_for, shapes)
    assert [j.name for j in jobs] == [f"search-{n}" for n in ORDER[1:]] + ["search", "heal"]
    assert jobs[2].needs == [f"search-{n}" for n in ORDER[1:]]

    r = _dry("launch", str(path), "--dry-run", "search.search.candidates=[L3-H64-F64-A4-G2]")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "error: stage search: search.fan_out submits every candidate; " \
        "drop search.candidates"


def _job(job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                          text=True).stdout
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def _after(job: str) -> list[str]:
    """The jobs ``job`` waits for (afterok), as scontrol shows them."""
    return re.findall(r"afterok:(\d+)", _job(job)["Dependency"])


def _wait(jobs: list[str], timeout: float = 240) -> dict[str, dict[str, str]]:
    end, final = time.time() + timeout, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    while time.time() < end:
        info = {j: _job(j) for j in jobs}
        if all(i.get("JobState") in final for i in info.values()):
            return info
        time.sleep(1)
    subprocess.run(["scancel", *jobs])
    raise AssertionError(f"jobs did not finish in {timeout} s: {info}")


def _ranked(out: Path) -> list[tuple[str, float, float]]:
    rows = json.loads((out / "search" / "candidates.json").read_text())["candidates"]
    rows.sort(key=lambda r: r["rank_retrained"])
    return [(r["name"], r["one_shot_loss"], r["retrained_loss"]) for r in rows]


@pytest.mark.slurm
def test_fanned_out_search_matches_one_process(slurm_cluster, teacher, tiny_overrides,
                                               tmp_path):
    # The two candidates closest to the budget, so that both candidate jobs run at once.
    args = [*_args(tiny_overrides), "search.retrain_steps=3", "search.max_candidates=2"]
    # Ranking alone before the candidates are retrained is a one-line error; nothing written.
    recipe = load_recipe(None, args + ["search.candidates=[]"], cls=SearchRecipe)
    with pytest.raises(ConfigError, match=r"^search.candidates=\[\] only ranks, and 2 "
                                          f"candidates are not finished .*: {ORDER[0]}, "):
        search(teacher, str(tmp_path / "early"), recipe)
    assert not (tmp_path / "early").exists()

    path = _pipeline(tmp_path, teacher, _config(args))
    r = _cli("launch", str(path))
    assert r.returncode == 0, r.stderr
    submitted = {j["stage"]: j["job_id"] for j in json.loads(r.stdout)}
    assert list(submitted) == [f"search-{n}" for n in ORDER[:2]] + ["search", "heal"]
    ids = list(submitted.values())
    try:
        assert _after(submitted["search"]) == ids[:2]
        assert _after(submitted["heal"]) == [submitted["search"]]
        # The distillation after the search is not needed here.
        subprocess.run(["scancel", submitted["heal"]], check=True)
        info = _wait(ids[:3])
    finally:
        subprocess.run(["scancel", *ids])
    out = tmp_path / "w" / "search"
    logs = {p.name: p.read_text() for p in (tmp_path / "w" / "logs" / "search").glob("*.out")}
    assert all(info[j]["JobState"] == "COMPLETED" for j in ids[:3]), logs
    # The ranking job started after both candidate jobs had ended, and retrained nothing.
    assert all(info[j]["EndTime"] <= info[ids[2]]["StartTime"] for j in ids[:2])
    rank_log = next(v for k, v in logs.items() if k.startswith(f"search-{ids[2]}"))
    assert rank_log.count("finished earlier, skipped") == 2
    # One writer of the ranking and the winner: the ranking job, never a candidate job.
    for name, text in logs.items():
        assert ("winner " in text) == name.startswith(f"search-{ids[2]}"), (name, text[-2000:])
    assert (out / "search" / "report.md").is_file() and (out / "winner").is_dir()

    ref = tmp_path / "one"
    res = run_cli("search", teacher, str(ref), *args)
    assert res.returncode == 0, res.stderr
    got, want = _ranked(out), _ranked(ref)
    assert [g[0] for g in got] == [w[0] for w in want] and {g[0] for g in got} == set(ORDER[:2])
    flat = [x for g in got for x in g[1:]]
    assert flat == pytest.approx([x for w in want for x in w[1:]], rel=1e-5, abs=1e-5)
    assert yaml.safe_load((out / "winner" / "model_config.yaml").read_text()) \
        == yaml.safe_load((ref / "winner" / "model_config.yaml").read_text())
    assert json.loads(res.stdout)["winner"] == got[0][0]



def test_source_from_an_earlier_stage(tmp_path):
    # The source does not exist yet: its shape is the earlier stage's model.
    data = {"workdir": str(tmp_path / "w"), "cluster": {"gpus_per_node": 0},
            "stages": [{"name": "teacher", "verb": "pretrain",
                        "config": {"model": SRC, **parse_overrides(FAST[3:])}},
                       {"name": "search", "verb": "search",
                        "args": ["{stages.teacher.output}", "{out}"], "config": _config(FAST)}]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    pipe = load_pipeline(path)
    cluster_for = cluster_resolver(pipe, {})
    shapes: dict = {}
    validate_pipeline(pipe, cluster_for, shapes=shapes)
    jobs = pipeline_jobs(pipe, pipe.stages, cluster_for, shapes)
    assert [(j.name, j.needs) for j in jobs] == [("teacher", [])] + [
        (f"search-{n}", ["teacher"]) for n in ORDER] + [
        ("search", ["teacher", *(f"search-{n}" for n in ORDER)])]

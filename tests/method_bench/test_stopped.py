"""A bench unit whose training is stopped (a signal, or here ``train.exit_interval``) is not a
result: the study stops with ``Stopped`` and records nothing; the same command then resumes the
run from its checkpoint and records it at its last step."""

from __future__ import annotations

import json
from pathlib import Path

from tests.dist import spawn
from tests.helpers.method_bench import smoke_overrides


def _teacher_twice(out: str, overrides: list[str], result: str) -> None:
    from benchmarks.method import load_bench_recipe
    from benchmarks.method.runner import Study
    from nemo_minitron.train.pretrain import Stopped

    outcomes = []
    for extra in (["teacher.train.exit_interval=2"], []):
        try:
            outcomes.append(Study(load_bench_recipe(None, overrides + extra), out).teacher())
        except Stopped as e:
            outcomes.append(f"stopped: {e}")
            outcomes.append((Path(out) / "units" / "teacher.json").exists())
    Path(result).write_text(json.dumps(outcomes))


def test_a_stopped_unit_is_not_recorded_and_resumes(tmp_path, data_cache):
    overrides = smoke_overrides(data_cache) + ["teacher.train.train_iters=4",
                                               "teacher.train.save_interval=2"]
    spawn(_teacher_twice, 1, str(tmp_path / "work"), overrides, str(tmp_path / "r.json"))
    stopped, recorded, final = json.loads((tmp_path / "r.json").read_text())
    assert stopped.startswith("stopped: step 2 reached") and "re-run" in stopped, stopped
    assert recorded is False
    assert final.endswith("step_0000004")
    unit = json.loads((tmp_path / "work" / "units" / "teacher.json").read_text())
    assert unit["checkpoint"] == final
    log = (tmp_path / "work" / "runs" / "teacher" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in log if json.loads(x).get("kind") == "train"]
    assert steps == [1, 2, 3, 4]  # resumed at 3, not retrained from 1

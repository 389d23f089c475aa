"""The top-level launcher/ (plain sbatch scripts, the job body the launch verb inlines) and the
files an installed package carries (recipes/, launcher/, every subpackage)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nemo_minitron.cli import build_parser
from nemo_minitron.config import recipe_path
from nemo_minitron.launch.sbatch import ClusterConfig, render_sbatch
from nemo_minitron.utils.paths import launcher_dir, recipes_dir

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "launcher").glob("*.sbatch"))


def test_checkout_paths():
    assert launcher_dir() == ROOT / "launcher" and recipes_dir() == ROOT / "recipes"
    assert recipe_path("tiny_cpu.yaml") == ROOT / "recipes" / "tiny_cpu.yaml"
    assert recipe_path("nothing.yaml") == Path("nothing.yaml")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_plain_sbatch_scripts(script, tmp_path):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    verbs = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert script.stem in verbs
    # Missing arguments: a usage line, exit 2, before anything SLURM-specific runs.
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and f"sbatch launcher/{script.stem}.sbatch RECIPE" in res.stderr


def test_launch_inlines_the_same_job_body(tmp_path):
    text = render_sbatch(ClusterConfig(gpus_per_node=0), ["python", "-m", "nemo_minitron"],
                         tmp_path, tmp_path)
    assert (ROOT / "launcher" / "job.sh").read_text() in text
    assert "@@" not in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_the_wheel_carries_recipes_launcher_and_every_subpackage(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "runs", "docs", "tests"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path / "whl"), str(src)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    (wheel,) = (tmp_path / "whl").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {str(p.relative_to(ROOT)) for p in (ROOT / "nemo_minitron").rglob("*.py")}
    want |= {f"nemo_minitron/{p.relative_to(ROOT)}" for d in ("recipes", "launcher")
             for p in (ROOT / d).rglob("*") if p.is_file()}
    assert want - names == set()


@pytest.mark.slurm
def test_plain_sbatch_script_on_a_cpu_node(slurm_cluster, tiny_overrides, tmp_path):
    """launcher/README.md's CPU form, submitted from the checkout root by a user whose PATH has
    no venv: the job finds the checkout's interpreter and trains."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    done = subprocess.run(["sbatch", "--parsable", "--wait", "--gpus-per-node=0",
                           "--ntasks-per-node=1", "--cpus-per-task=1",
                           f"--output={tmp_path}/%x-%j.out", "launcher/pretrain.sbatch",
                           str(ROOT / "recipes" / "tiny_cpu.yaml"), str(out), *tiny_overrides,
                           "train.train_iters=2", "train.eval_interval=0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert done.returncode == 0, (done.stderr, log)
    assert (out / "checkpoints" / "step_0000002" / "weights").is_dir(), log

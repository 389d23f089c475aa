"""The README's commands, run the way a user runs them: every ```` ```bash ```` block, in the
order of the page, in one bash session, in a directory laid out like a clone (the repository's
entries linked in, ``.venv`` included, no ``runs/``), with ``.venv/bin`` off ``PATH`` (the
README's own ``source .venv/bin/activate`` must put it there) and ``HOME`` a fresh directory
(so the data cache starts empty). A command that fails fails the test, naming it.

Only the scale changes, and only by appending arguments:

- ``TINY[verb]`` is appended to each command of that verb (``scripts/demo``, ``nemo-minitron
  VERB``, ``torchrun ... -m nemo_minitron VERB``): a smaller corpus and vocabulary, two training
  steps (and distillation's guard against an untrained teacher relaxed), a few calibration
  samples, a few generated tokens; ``scripts/test`` only collects, in one process;
- every checkpoint step ``step_NNNNNNN`` becomes ``step_0000002``, where the two-step runs end.

A block right after a line ``<!-- readme-test: skip: REASON -->`` is not run (a cluster,
Docker, a GPU, or tens of minutes); ```` ```text ```` blocks are synopses with placeholders.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

DATA = ["data.corpus_max_bytes=1500000", "data.tokenizer_vocab_size=1000"]
TRAIN = ["train.train_iters=2", "train.eval_interval=2", "train.eval_iters=1",
         "train.save_interval=2", "train.log_interval=1", "train.lr_warmup_iters=1",
         "train.micro_batch_size=2", "train.global_batch_size=2"]
CALIB = ["calib.num_samples=4", "calib.eval_samples=4", "calib.micro_batch_size=2"]
# A two-step teacher is barely better than chance: distillation's untrained-teacher guard
# would refuse it.
KD = [*TRAIN, "kd.teacher_max_loss_ratio=1.5"]
TINY: dict[str, list[str]] = {
    "scripts/demo": [*TRAIN, *DATA, *(f"prune.{o}" for o in CALIB),
                     *(f"distill.{o}" for o in KD)],
    "scripts/test": ["--collect-only"],
    "prune": [*DATA, *CALIB],
    "distill": [*DATA, *KD],
    "teacher-cache": [*DATA, *KD],
    "sft": TRAIN,
    "instruct-data": ["--corpus-max-bytes", "1500000", "--max-chars", "800"],
    "self-distill": ["--max-new-tokens", "4"],
    "eval": ["--max-windows", "2"],
    "generate": ["--max-new-tokens", "4"],
    "specdec": ["--num-prompts", "2", "--max-new-tokens", "4", "--draft-tokens", "1,2"],
}
STEP = "step_0000002"
SKIP = re.compile(r"<!-- readme-test: skip: (.+) -->", re.S)
VERB = re.compile(r"^(?:\S*nemo-minitron|torchrun .*-m nemo_minitron) ([a-z-]+)")


def _comment_start(line: str) -> int:
    """Index of a trailing ``# comment`` outside quotes, else the line's length."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return i
    return len(line)


def readme_blocks(text: str) -> list[tuple[list[str], str | None]]:
    """``(commands, skip reason or None)`` of every bash block: continuation lines joined,
    comments cut."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        start = i - 1  # a skip comment ends on the line right before the fence
        while start > 0 and lines[i - 1].rstrip().endswith("-->") \
                and "<!--" not in lines[start]:
            start -= 1
        skip = SKIP.fullmatch(" ".join(lines[start:i]).strip()) if start < i else None
        body = []
        i += 1
        while lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        commands, current = [], ""
        for line in body:
            line = line[:_comment_start(line)].rstrip()
            if line.endswith("\\"):
                current += line[:-1] + " "
                continue
            current = (current + line).strip()
            if current:
                commands.append(" ".join(current.split()))
            current = ""
        blocks.append((commands, skip[1].strip() if skip else None))
    return blocks


def tiny(command: str) -> str:
    """``command`` at tiny scale: ``TINY``'s arguments appended, steps renamed."""
    command = re.sub(r"step_\d{7}", STEP, command)
    verb = VERB.match(command)
    key = verb[1] if verb else command.split()[0]
    return " ".join([command, *TINY.get(key, [])])


def test_readme_blocks_are_parsed():
    blocks = readme_blocks((ROOT / "README.md").read_text())
    run = [c for commands, skip in blocks if skip is None for c in commands]
    skipped = [reason for _, reason in blocks if reason is not None]
    assert run[:3] == ["scripts/demo", "scripts/test", "source .venv/bin/activate"]
    assert all(reason.strip() for reason in skipped) and len(skipped) >= 4
    placeholders = [c for c in run if re.search(r"\b(CKPT|PRUNED|TEACHER|PREFIX|OUT)\b", c)]
    assert not placeholders, placeholders


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    clone, home = tmp_path / "clone", tmp_path / "home"
    clone.mkdir()
    home.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", "runs"}:
            (clone / entry.name).symlink_to(entry)
    script = ["set -eo pipefail",
              "trap 'echo \"README command failed (status $?): $BASH_COMMAND\" >&2' ERR"]
    for commands, skip in readme_blocks((ROOT / "README.md").read_text()):
        if skip is None:
            script += [tiny(c) for c in commands]
    venv = str(ROOT / ".venv" / "bin")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if p.rstrip("/") != venv)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "VIRTUAL_ENV", "NM_TEST"))}
    env.update(PATH=path, HOME=str(home), NM_TEST_WORKERS="0")
    res = subprocess.run(["bash", "-c", "\n".join(script)], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=900)
    (tmp_path / "log").write_text(res.stdout + res.stderr)  # kept for a failure's whole story
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    for produced in ("runs/demo/data/corpus.idx", "runs/hf_distilled/model.safetensors",
                     "runs/specdec/specdec.md", "runs/merged/model_config.yaml"):
        assert (clone / produced).is_file(), produced

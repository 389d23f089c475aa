"""``self-distill`` end to end on a tiny teacher (a transformers model imported with import-hf):
DP=2 writes the same file as one rank; a run killed mid-way and restarted writes the same file
as an uninterrupted one and generates no example twice (generation calls counted); greedy
rewrites equal transformers' greedy generation on the export-hf'd weights, token for token,
and TP=2's;
bad input is a one-line error with nothing written."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import random
from pathlib import Path

import pytest
import torch

from tests.dist import spawn
from tests.interop.hfmodels import WORDS, save_hf_model

MAX_NEW = 12
WORD_TEMPLATE = "{instruction} w0 w1 {reference} w2"  # words of the tiny tokenizer
BATCH = 3
SAMPLED = ["--max-new-tokens", str(MAX_NEW), "--batch-size", str(BATCH), "--temperature", "1.0",
           "--top-p", "0.9", "--seed", "5"]


class Killed(BaseException):
    """Stands for a kill between two generation calls."""


def _args(root: Path, out: str, *extra: str) -> list[str]:
    return ["self-distill", str(root / "ck"), str(root / "data.jsonl"), "--out",
            str(root / out), *extra]


def _write_data(path: Path) -> None:
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(3, WORDS - 3)}" for _ in range(n))

    rows = []
    for i in range(10):
        if i % 2:
            rows.append({"instruction": words(3), "input": words(2) if i % 3 else "",
                         "output": words(4), "id": i})
        else:
            rows.append({"messages": [{"role": "system", "content": words(2)},
                                      {"role": "user", "content": words(3 + i % 4)},
                                      {"role": "assistant", "content": words(5)}]})
    rows.insert(4, {"instruction": words(2), "output": words(200)})  # too long to rewrite
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def counting_generate(run: dict) -> None:
    """Wrap ``eval.generate.generate``: record every batch of prompts in ``run["calls"]``;
    raise ``Killed`` once ``run["kill_after"]`` calls were made."""
    import nemo_minitron.eval.generate as g

    real = g.generate

    def generate(model, prompts, sampling, **kw):
        if run["kill_after"] is not None and len(run["calls"]) >= run["kill_after"]:
            raise Killed()
        run["calls"].append([list(p) for p in prompts])
        return real(model, prompts, sampling, **kw)

    g.generate = generate


def one_rank_job(root: str) -> None:
    from nemo_minitron.cli import main
    from nemo_minitron.interop.hf_export import export_hf
    from nemo_minitron.interop.hf_import import import_hf
    from nemo_minitron.selfdistill.stage import parts_dir

    torch.set_num_threads(1)  # the same kernels as the DP=2 job's ranks
    r = Path(root)
    import_hf(r / "hf", r / "ck", seq_length=128)
    import_hf(r / "hf_other", r / "ck_other", seq_length=128)
    export_hf(r / "ck", r / "exported")
    calls: dict[str, list] = {}
    run: dict = {"calls": [], "kill_after": None}
    counting_generate(run)
    calls["greedy"] = run["calls"]
    assert main(_args(r, "greedy.jsonl", "--greedy", "--max-new-tokens", str(MAX_NEW),
                      "--batch-size", str(BATCH), "--prompt-template",
                      str(r / "template.txt"))) == 0
    for name in ("full", "killed", "resumed"):
        run["calls"] = calls[name] = []
        run["kill_after"] = 2 if name == "killed" else None
        out = "full.jsonl" if name == "full" else "run.jsonl"
        with contextlib.suppress(Killed):
            assert main(_args(r, out, *SAMPLED)) == 0
        if name == "killed":
            parts = parts_dir(r / out)
            assert not (r / out).exists() and not (r / "run.stats.json").exists()
            assert sorted(p.name for p in parts.glob("batch_*")) == ["batch_000000.jsonl",
                                                                    "batch_000001.jsonl"]
            (parts / ".batch_000002.jsonl.x1y2").write_text('{"index": 0, "i')  # killed write
            err = io.StringIO()
            with contextlib.redirect_stderr(err):  # other settings are refused
                assert main(_args(r, out, *SAMPLED[:-1], "6")) == 2
            (r / "changed.txt").write_text(err.getvalue())
    (r / "run.jsonl").rename(r / "resumed.jsonl")
    (r / "run.stats.json").rename(r / "resumed.stats.json")
    (r / "calls.json").write_text(json.dumps(calls))


def dp2_job(root: str) -> None:
    from nemo_minitron.cli import build_parser, main

    r = Path(root)
    # The verb without main()'s shutdown: re-creating a 2-process group in one process hangs.
    args = build_parser().parse_args(_args(r, "dp2.jsonl", *SAMPLED))
    assert args.func(args) == 0
    assert main(_args(r, "tp2_greedy.jsonl", "--greedy", "--max-new-tokens", str(MAX_NEW),
                      "--batch-size", str(BATCH), "--prompt-template", str(r / "template.txt"),
                      "parallel.tensor_model_parallel_size=2")) == 0


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sdd")
    save_hf_model(root / "hf", "llama", seed=5, max_position_embeddings=128)
    # The stop token's output row follows token 94's, so that some greedy rewrites stop
    # before max_new_tokens (3 of 10 with this seed and template).
    model = AutoModelForCausalLM.from_pretrained(str(root / "hf"))
    with torch.no_grad():
        model.lm_head.weight[2] = 1.2 * model.lm_head.weight[94]
    model.save_pretrained(str(root / "hf"))
    save_hf_model(root / "hf_other", "llama", seed=6, max_position_embeddings=128,
                  tokenizer=False)
    from tests.interop.hfmodels import save_tokenizer

    save_tokenizer(root / "hf_other", words=WORDS - 10)
    _write_data(root / "data.jsonl")
    (root / "template.txt").write_text(WORD_TEMPLATE)
    spawn(one_rank_job, 1, str(root))
    return root


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.dist
def test_dp2_and_tp2_write_the_same_files_as_one_rank(result):
    spawn(dp2_job, 2, str(result))
    # TP=2 (one rank writes the shards of its TP group) generates the same greedy rewrites.
    assert (result / "tp2_greedy.jsonl").read_text() == (result / "greedy.jsonl").read_text()
    inputs = _lines(result / "data.jsonl")
    full = _lines(result / "full.jsonl")
    assert (result / "dp2.jsonl").read_text() == (result / "full.jsonl").read_text()
    dp2_stats = json.loads((result / "dp2.stats.json").read_text())
    assert dp2_stats == json.loads((result / "full.stats.json").read_text())
    # Input order and size; the too-long example keeps its answer, the others were sampled.
    assert len(full) == len(inputs) == 11
    for a, b in zip(inputs, full):
        assert set(a) == set(b) and a.get("instruction") == b.get("instruction")
    assert full[4] == inputs[4]
    assert dp2_stats["rejected_by_reason"]["too_long"] == 1
    assert [r["line"] for r in dp2_stats["rejections"] if r["reason"] == "too_long"] == [5]
    rewritten = [i for i, (a, b) in enumerate(zip(inputs, full)) if a != b]
    assert len(rewritten) == dp2_stats["kept"]
    assert not (result / "dp2.jsonl.parts").exists()


def test_killed_and_restarted_equals_uninterrupted(result):
    calls = json.loads((result / "calls.json").read_text())
    assert (result / "resumed.jsonl").read_text() == (result / "full.jsonl").read_text()
    assert (json.loads((result / "resumed.stats.json").read_text())
            == json.loads((result / "full.stats.json").read_text()))
    assert len(calls["killed"]) == 2 and len(calls["resumed"]) == 2  # 10 prompts, batches of 3

    def prompts(runs):
        return collections.Counter(tuple(p) for run in runs for batch in run for p in batch)

    once = prompts([calls["full"]])
    assert sum(once.values()) == 10 and set(once.values()) == {1}
    assert prompts([calls["killed"], calls["resumed"]]) == once  # nothing generated twice
    changed = (result / "changed.txt").read_text()
    assert "holds an unfinished run with other settings (seed: 5 there, 6 now)" in changed


def test_greedy_rewrites_equal_transformers(result):
    from transformers import AutoModelForCausalLM

    from nemo_minitron.checkpoint.io import load_checkpoint_tokenizer
    from nemo_minitron.data.instruct import read_jsonl, render_prompt
    from nemo_minitron.selfdistill.prompt import rewrite_messages

    tok = load_checkpoint_tokenizer(result / "ck")
    hf = AutoModelForCausalLM.from_pretrained(str(result / "exported"),
                                              attn_implementation="eager")
    stats = json.loads((result / "greedy.stats.json").read_text())
    rejected = {r["line"]: r for r in stats["rejections"]}
    out = read_jsonl(result / "greedy.jsonl")
    stopped = 0
    for e, got in zip(read_jsonl(result / "data.jsonl"), out):
        if e.line in rejected and rejected[e.line]["reason"] == "too_long":
            continue
        prompt = tok.encode(render_prompt(tok, rewrite_messages(e, WORD_TEMPLATE)))
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                          eos_token_id=tok.eod, pad_token_id=tok.eod,
                          suppress_tokens=list(range(tok.vocab_size, hf.config.vocab_size)))
        ids = ids[0, len(prompt):].tolist()
        hf_stopped = ids[-1] == tok.eod
        stopped += hf_stopped
        if hf_stopped:
            ids = ids[:-1]
        ours = rejected[e.line]["rewrite"] if e.line in rejected else got.response
        assert tok.encode(ours) == ids, e.line
        # Kept exactly when the generation stopped by itself (no other rule applies here).
        assert (e.line not in rejected) == hf_stopped, e.line
    assert 0 < stopped < 10  # both kinds of rewrite occur
    assert stats["kept"] + stats["rejected"] == 11 and stats["kept"] > 0
    assert stats["rejected_by_reason"]["truncated"] == 10 - stopped


@pytest.mark.parametrize("make, args, needles", [
    (lambda r: r / "bad.jsonl", ["--greedy"], ["bad.jsonl:2: not JSON"]),
    (lambda r: r / "nofields.jsonl", [], ["nofields.jsonl:1: needs 'instruction' and 'output'"]),
    (lambda r: r / "empty.jsonl", [], ["empty.jsonl: the data set is empty"]),
    (lambda r: r / "role.jsonl", [], ["role.jsonl:1: messages[0] has unknown role 'tool'"]),
    (lambda r: r / "data.jsonl", ["--verifier", "no_such_mod_q:check"],
     ["verifier='no_such_mod_q:check' cannot be imported"]),
    (lambda r: r / "data.jsonl", ["--max-new-tokens", "127"],
     ["every rewrite prompt is longer than the teacher's seq_length 128"]),
    (lambda r: r / "data.jsonl", ["--student", "STUDENT"],
     ["the teacher's tokenizer differs from the student's"]),
    (lambda r: r / "data.jsonl", ["--prompt-template", "TEMPLATE"],
     ["prompt template: unknown field {answer}"]),
    (lambda r: r / "data.jsonl", ["parallel.pipeline_model_parallel_size=2"],
     ["pipeline_model_parallel_size=1"]),
    (lambda r: r / "data.jsonl", ["--top-p", "0"], ["--top-p=0.0 must be in (0, 1]"]),
    (lambda r: r / "data.jsonl", ["--max-new-tokens", "0"], ["max_new_tokens=0 must be >= 1"]),
    (lambda r: r / "data.jsonl", ["--out", "EXISTING"], ["already exists"]),
])
def test_bad_input_is_a_one_line_error(result, tmp_path, make, args, needles):
    from nemo_minitron.cli import main

    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    (tmp_path / "nofields.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "role.jsonl").write_text(json.dumps(
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]})
        + "\n")
    (tmp_path / "t.txt").write_text("{instruction} {answer}")
    (tmp_path / "existing.jsonl").write_text("keep me\n")
    data = make(tmp_path) if make(tmp_path).exists() else make(result)
    out = tmp_path / "out.jsonl"
    subst = {"STUDENT": str(result / "ck_other"), "TEMPLATE": str(tmp_path / "t.txt"),
             "EXISTING": str(tmp_path / "existing.jsonl")}
    args = [subst.get(a, a) for a in args]
    if "--out" not in args:
        args += ["--out", str(out)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["self-distill", str(result / "ck"), str(data), *args])
    lines = [x for x in err.getvalue().splitlines() if x.startswith("error: ")]
    assert rc == 2 and len(lines) == 1, err.getvalue()
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "out.jsonl.parts").exists()
    assert (tmp_path / "existing.jsonl").read_text() == "keep me\n"


def test_sampling_defaults_and_the_settings_a_restart_compares():
    """The teacher's decoding is one ``SamplingConfig`` with self-distill's defaults; the
    settings written to ``OUT.parts/meta.json`` keep the flat keys runs wrote before it was
    nested, so an unfinished run of the same command still resumes."""
    from nemo_minitron.selfdistill.stage import SelfDistillConfig

    cfg = SelfDistillConfig()
    earlier = {"max_new_tokens": 512, "greedy": False, "temperature": 0.7, "top_p": 0.95,
               "top_k": 0, "seed": 0, "batch_size": 8, "prompt_template": cfg.prompt_template}
    settings = cfg.generation_settings()
    assert {k: settings[k] for k in earlier} == earlier
    assert set(settings) - set(earlier) == {"stop_tokens"} and settings["stop_tokens"] is None
    batch = cfg.batch_sampling(3, eos_ids=[7])  # batch k samples with seed + k
    assert (batch.seed, batch.stop_tokens, batch.temperature) == (3, [7], 0.7)

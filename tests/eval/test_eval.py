"""Evaluation against transformers: perplexity on text files equals the HF model's own loss on
the same windows; KV-cached generation equals uncached generation token for token (greedy and
sampled) and HF's greedy ``generate``; ``bench`` prints its side-by-side table."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch

from tests.dist import spawn
from tests.interop.hfmodels import WORDS, save_hf_model

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
SEQ = 16


def eval_job(root: str) -> None:
    from nemo_minitron.checkpoint.io import load_model_config, load_weights
    from nemo_minitron.cli import main
    from nemo_minitron.eval.generate import SamplingConfig, generate
    from nemo_minitron.eval.perplexity import PerplexityConfig, perplexity
    from nemo_minitron.interop.hf_import import import_hf
    from nemo_minitron.model.build import build_model

    r = Path(root)
    import_hf(r / "hf", r / "ck")
    import_hf(r / "hf_small", r / "ck_small")
    files = sorted(str(p) for p in r.glob("doc*.txt"))
    ppl = perplexity(str(r / "ck"), PerplexityConfig(seq_length=SEQ, micro_batch_size=2), files)
    model = build_model(load_model_config(r / "ck"))
    load_weights(r / "ck", model)
    greedy = SamplingConfig(max_new_tokens=10)
    sampled = SamplingConfig(max_new_tokens=10, greedy=False, temperature=0.8, top_k=30,
                             top_p=0.9, seed=3)
    out = {"ppl": ppl,
           "greedy_cache": generate(model, PROMPTS, greedy),
           "greedy_nocache": generate(model, PROMPTS, greedy, use_cache=False),
           "sampled_cache": generate(model, PROMPTS, sampled),
           "sampled_nocache": generate(model, PROMPTS, sampled, use_cache=False)}
    # Stop tokens: the 4th greedy token of row 0 and the 6th of row 2 (row 1 may not stop).
    stops = [out["greedy_cache"][0][3], out["greedy_cache"][2][5]]
    out["stops"] = stops
    out["greedy_stop"] = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10,
                                                                 stop_tokens=stops))
    (r / "out.json").write_text(json.dumps(out))
    with open(r / "bench.txt", "w") as f, contextlib.redirect_stdout(f):
        main(["bench", str(r / "ck"), str(r / "ck_small"), "--profile", "--batch-size", "2",
              "--seq-length", "16", "--decode-tokens", "4", "--repeats", "2"])
    with open(r / "bench_sdpa.txt", "w") as f, contextlib.redirect_stdout(f):
        main(["bench", str(r / "ck"), str(r / "ck_small"), "--batch-size", "2",
              "--seq-length", "16", "--decode-tokens", "4", "--repeats", "1", "--attention",
              "sdpa", "--sequential"])


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("eval")
    save_hf_model(root / "hf", "llama", seed=7)
    save_hf_model(root / "hf_small", "llama", seed=8, hidden_size=32, intermediate_size=64)
    rng = random.Random(0)
    for i in range(2):
        words = " ".join(f"w{rng.randrange(WORDS - 3)}" for _ in range(150))
        (root / f"doc{i}.txt").write_text(words)
    spawn(eval_job, 1, str(root))
    return root, json.loads((root / "out.json").read_text())


def test_perplexity_equals_transformers_loss(result):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, out = result
    tok = AutoTokenizer.from_pretrained(str(root / "hf"))
    ids: list[int] = []
    for p in sorted(root.glob("doc*.txt")):
        ids += tok.encode(p.read_text(), add_special_tokens=False) + [tok.eos_token_id]
    n = len(ids) // (SEQ + 1) // 2 * 2  # whole micro-batches of 2
    windows = torch.tensor(ids[:n * (SEQ + 1)]).view(n, SEQ + 1)
    model = AutoModelForCausalLM.from_pretrained(str(root / "hf"), attn_implementation="eager")
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             windows[:, 1:].reshape(-1)).item()
    assert out["ppl"]["windows"] == n and out["ppl"]["tokens"] == n * SEQ
    assert out["ppl"]["loss"] == pytest.approx(loss, abs=1e-4)
    assert out["ppl"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_kv_cache_generation_equals_uncached(result):
    _, out = result
    assert out["greedy_cache"] == out["greedy_nocache"]
    assert out["sampled_cache"] == out["sampled_nocache"]
    assert out["sampled_cache"] != out["greedy_cache"]
    assert all(len(row) == 10 for row in out["greedy_cache"])


def test_generation_stops_before_any_stop_token(result):
    _, out = result
    for full, stopped in zip(out["greedy_cache"], out["greedy_stop"]):
        cut = next((i for i, t in enumerate(full) if t in out["stops"]), len(full))
        assert stopped == full[:cut]  # the stop token itself is not returned
    assert len(out["greedy_stop"][0]) <= 3 and len(out["greedy_stop"][2]) <= 5


def test_greedy_equals_transformers_generate(result):
    from transformers import AutoModelForCausalLM

    root, out = result
    model = AutoModelForCausalLM.from_pretrained(str(root / "hf"), attn_implementation="eager")
    for prompt, ours in zip(PROMPTS, out["greedy_cache"]):
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        hf = hf[0, len(prompt):].tolist()
        assert hf and ours[:len(hf)] == hf


def _hf_flops_per_token(directory: Path, context: float) -> tuple[float, int]:
    """Forward FLOPs per token counted on the transformers model: 2 per weight of every
    decoder layer and the output layer, plus QK^T and AV over ``context`` tokens; and the
    parameter count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory))
    c = model.config
    weights = sum(p.numel() for p in model.model.layers.parameters()) \
        + model.lm_head.weight.numel()
    attn = 4 * c.num_hidden_layers * context * c.num_attention_heads * (
        c.hidden_size // c.num_attention_heads)
    return 2 * weights + attn, sum(p.numel() for p in model.parameters())


def _ratio(cell: str) -> tuple[float, float, float]:
    """``"1.23 (1.20-1.25)"`` -> (median, lowest, highest)."""
    med, rng = cell.strip().split(" (")
    lo, hi = rng.rstrip(")").split("-")
    return float(med), float(lo), float(hi)


def test_bench_prints_table(result):
    root, _ = result
    lines = (root / "bench.txt").read_text().strip().splitlines()
    assert lines[0] == ("| checkpoint | params | prefill tok/s | ratio (range) | FLOP ratio | "
                        "share | decode tok/s | ratio (range) | FLOP ratio | share |")
    first, small = ([c.strip() for c in line.split("|")[1:-1]] for line in lines[2:4])
    for col in (3, 7):  # the reference against itself: 1 in every round
        assert _ratio(first[col]) == (1.0, 1.0, 1.0)
        med, lo, hi = _ratio(small[col])
        assert 0 < lo <= med <= hi
    small = [_ratio(c)[0] if i in (3, 7) else c for i, c in enumerate(small)]
    # Prompt of 16 tokens (a prefill token attends to 8 on average), 4 decoded after it.
    for phase, col, context in (("prefill", 4, 16 / 2), ("decode", 8, 16 + 4 / 2)):
        big, n_big = _hf_flops_per_token(root / "hf", context)
        little, n_little = _hf_flops_per_token(root / "hf_small", context)
        assert float(small[col]) == pytest.approx(big / little, abs=0.006), phase
        assert big / little > 1.2, phase  # a difference the table must show
        # share = measured ratio / FLOP ratio, from the printed cells (each rounded to 0.005)
        r, f = float(small[col - 1]), float(small[col])
        assert abs(float(small[col + 1]) - r / f) <= 0.005 + 0.005 * (1 + r / f) / f + 1e-9, \
            (phase, small)
    assert (first[1], small[1]) == (f"{n_big / 1e6:.2f}M", f"{n_little / 1e6:.2f}M")
    for row in (first, small):
        assert float(row[2]) > 0 and float(row[6]) > 0  # measured tokens per second
    # --profile: one line per checkpoint with the matrix-product share and the top operators
    prof = [line for line in lines[4:] if line.startswith("decode profile of")]
    assert len(prof) == 2 and all("aten::mm" in line for line in prof)
    assert all(0 < int(line.split("matrix products ")[1].split("%")[0]) < 100 for line in prof)


def test_bench_with_sdpa_attention_one_checkpoint_at_a_time(result):
    root, _ = result
    lines = (root / "bench_sdpa.txt").read_text().strip().splitlines()
    assert len(lines) == 4 and float(lines[3].split("|")[3]) > 0  # prefill tok/s
    assert _ratio(lines[3].split("|")[4])[0] > 0


def test_bench_refuses_unknown_attention(capsys):
    from nemo_minitron.cli import main

    assert main(["bench", "ck", "--attention", "flash"]) == 2
    assert "error: attention='flash'" in capsys.readouterr().err


class _Records(logging.Handler):
    """The package logger does not propagate to pytest's caplog: collect its records here."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_of_generate():
    handler = _Records()
    logger = logging.getLogger("nemo_minitron.eval.generate")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_chat_prompts_of_generate_and_specdec(tmp_path, embedded_paths, warnings_of_generate):
    """``generate --chat`` and ``specdec --chat`` format a prompt as
    ``transformers.apply_chat_template`` does with the tokenizer's template, without a warning;
    a tokenizer without a template gets the plain default format and one warning per run."""
    from transformers import AutoTokenizer

    from nemo_minitron.data.tokenizer import SentencePieceTokenizer, load_tokenizer
    from nemo_minitron.eval.generate import chat_prompts
    from nemo_minitron.eval.specdec_run import read_prompts
    from tests.helpers.data import CHATML, _hf_tokenizer_dir

    hf = _hf_tokenizer_dir(tmp_path / "tok")
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML}))
    texts = ["Name a colour.", "def f(x):"]
    ref = AutoTokenizer.from_pretrained(hf)
    want = [ref.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                    add_generation_prompt=True) for t in texts]
    tok = load_tokenizer(hf)
    assert chat_prompts(tok, texts) == want
    lines = tmp_path / "prompts.txt"
    lines.write_text("\n".join(texts) + "\n")
    assert read_prompts(tok, str(lines), None, 8, 32, chat=True) == [tok.encode(w) for w in want]
    assert warnings_of_generate == []

    sp = SentencePieceTokenizer(embedded_paths[1])
    assert chat_prompts(sp, texts) == [f"### User:\n{t}\n\n### Assistant:\n" for t in texts]
    assert len(warnings_of_generate) == 1 and "no chat template" in warnings_of_generate[0]
    assert read_prompts(sp, str(lines), None, 8, 32) == [sp.encode(t) for t in texts]  # no --chat
    assert len(warnings_of_generate) == 1


def test_windows_and_generation_past_the_context_warn_once(teacher, embedded_paths):
    from nemo_minitron.checkpoint.io import load_model_config
    from tests.cli import run_cli

    ctx = load_model_config(teacher).context_length  # 64
    res = run_cli("eval", teacher, "--data", embedded_paths[0], "--seq-length", str(2 * ctx),
                  "--max-windows", "2", "--micro-batch-size", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    warned = [x for x in res.stderr.splitlines() if "past the model's context length" in x]
    assert len(warned) == 1 and f"--seq-length={2 * ctx}" in warned[0], res.stderr
    res = run_cli("eval", teacher, "--data", embedded_paths[0], "--max-windows", "2",
                  "--micro-batch-size", "2")  # the model's own windows: no warning
    assert res.returncode == 0 and "context length" not in res.stderr, res.stderr[-2000:]
    res = run_cli("generate", teacher, "--prompt", "def f(x):", "--prompt", "import os",
                  "--max-new-tokens", str(ctx))
    assert res.returncode == 0, res.stderr[-2000:]
    warned = [x for x in res.stderr.splitlines() if "past the model's context length" in x]
    assert len(warned) == 1 and f"--max-new-tokens={ctx}" in warned[0], res.stderr

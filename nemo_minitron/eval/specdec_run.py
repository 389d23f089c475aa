"""``specdec``: load a target and a draft checkpoint, run speculative decoding on prompts for
each ``K`` and report the acceptance figures and the speed-up against the target alone.

The target alone (``eval.generate``) and speculative decoding run on the same prompts, one
after the other in each repeat after one untimed warm-up of both; tokens/s is generated tokens
over wall time. The cost ratio ``c`` of the predicted speed-up is measured in the same run:
seconds of single-token KV-cache decode steps of the draft / of the target
(``eval.bench.decode_seconds``, the first batch's prompts). No stop token: every row generates
``max_new_tokens``, so both sides generate the same number of tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemo_minitron.config import ConfigError, ParallelConfig
from nemo_minitron.eval.generate import SamplingConfig
from nemo_minitron.utils.logging import get_logger

log = get_logger("eval.specdec")


@dataclass(kw_only=True)
class SpecDecConfig:
    """What ``specdec`` measures."""

    draft_tokens: list[int] = field(default_factory=lambda: [4])
    """Draft tokens per verification step K; several values make a sweep."""
    batch_size: int = 1
    """Prompts decoded together."""
    repeats: int = 1
    """Timed runs of each side (after one warm-up)."""

    def __post_init__(self) -> None:
        if not self.draft_tokens or any(k < 1 for k in self.draft_tokens):
            raise ConfigError(f"draft_tokens={self.draft_tokens}: every K must be at least 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
        if self.repeats < 1:
            raise ConfigError(f"repeats={self.repeats} must be at least 1")


def check_pair(target: str, draft: str) -> None:
    """One-line error unless both are checkpoints with the same tokenizer and vocabulary."""
    from nemo_minitron.checkpoint.io import (
        check_checkpoint,
        load_checkpoint_tokenizer,
        load_model_config,
    )
    from nemo_minitron.data.tokenizer import same_tokenizer, tokenizer_label

    check_checkpoint(target, "target")
    check_checkpoint(draft, "draft")
    tt, dt = load_checkpoint_tokenizer(target), load_checkpoint_tokenizer(draft)
    if not same_tokenizer(tt, dt):
        raise ConfigError(f"target {target!r} and draft {draft!r} have different tokenizers: "
                          f"{tokenizer_label(tt)} vs {tokenizer_label(dt)}")
    tv, dv = load_model_config(target).vocab_size, load_model_config(draft).vocab_size
    if tv != dv:
        raise ConfigError(f"target {target!r} (model.vocab_size={tv}) and draft {draft!r} "
                          f"(model.vocab_size={dv}) have different vocabularies")


def check_prompts(prompts: list[list[int]], max_new_tokens: int,
                  contexts: dict[str, int]) -> None:
    """One-line error for an empty prompt or one that does not fit a model's context."""
    if not prompts:
        raise ConfigError("no prompts")
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompt {i} is empty")
        for name, seq in contexts.items():
            if len(p) + max_new_tokens > seq:
                raise ConfigError(f"prompt {i}: {len(p)} tokens + max_new_tokens="
                                  f"{max_new_tokens} exceed the context of {name} "
                                  f"(model.seq_length={seq})")


def check_parallel(parallel: ParallelConfig) -> None:
    """One-line error for a layout speculative decoding does not run (PP > 1)."""
    if parallel.pipeline_model_parallel_size > 1:
        raise ConfigError(f"parallel.pipeline_model_parallel_size="
                          f"{parallel.pipeline_model_parallel_size}: speculative decoding runs "
                          "the target and the draft with pipeline_model_parallel_size=1")


def load_models(target: str, draft: str, parallel: ParallelConfig) -> tuple[Any, Any, Any]:
    """``(target model, draft model, tokenizer)``, after checking the pair."""
    from nemo_minitron.checkpoint.io import (
        load_checkpoint_tokenizer,
        load_model_config,
        load_weights,
    )
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    check_pair(target, draft)
    check_parallel(parallel)
    init_distributed(parallel)
    models = []
    for path in (target, draft):
        m = build_model(load_model_config(path), use_te=False)  # see check_local_attention
        load_weights(path, m)
        m.eval()
        models.append(m)
    return models[0], models[1], load_checkpoint_tokenizer(target)


def _batches(prompts: list[list[int]], size: int) -> list[list[list[int]]]:
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


def cost_ratio(target: Any, draft: Any, prompts: list[list[int]], steps: int) -> float:
    """Draft / target seconds of ``steps`` single-token decode steps after the same prompts
    (truncated to the shortest), each the best of two runs."""
    from nemo_minitron.eval.bench import decode_seconds

    n = min(len(p) for p in prompts)
    device = next(target.parameters()).device
    batch = torch.tensor([p[:n] for p in prompts], device=device)
    t = [min(decode_seconds(m, batch, steps) for _ in range(2)) for m in (target, draft)]
    return t[1] / t[0]


def measure(target: Any, draft: Any, prompts: list[list[int]], sampling: SamplingConfig,
            k: int, cfg: SpecDecConfig, vocab_limit: int | None, c: float) -> dict[str, Any]:
    """Figures of one K: acceptance, tokens/s of both sides, measured and predicted speed-up."""
    from nemo_minitron.eval.decode import sync
    from nemo_minitron.eval.generate import generate
    from nemo_minitron.eval.specdec import SpecStats, predicted_speedup, speculative_generate

    batches = _batches(prompts, cfg.batch_size)

    def run_target() -> list[list[int]]:
        return [r for bt in batches for r in generate(target, bt, sampling,
                                                      vocab_limit=vocab_limit)]

    def run_spec(stats: SpecStats | None) -> list[list[int]]:
        return [r for bt in batches for r in speculative_generate(
            target, draft, bt, sampling, k, vocab_limit=vocab_limit, stats=stats)]

    stats = SpecStats()
    ref, out = run_target(), run_spec(stats)  # warm-up; the figures come from this run
    t_target = t_spec = 0.0
    for r in range(cfg.repeats):
        for side in ("target", "spec"):
            sync()
            t0 = time.perf_counter()
            run_target() if side == "target" else run_spec(None)
            sync()
            dt = time.perf_counter() - t0
            if side == "target":
                t_target += dt
            else:
                t_spec += dt
        log.info("K=%d repeat %d/%d: target %.2fs, speculative %.2fs", k, r + 1, cfg.repeats,
                 t_target / (r + 1), t_spec / (r + 1))
    n_tokens = sum(len(row) for row in out) * cfg.repeats
    n_ref = sum(len(row) for row in ref) * cfg.repeats
    fig = stats.figures()
    target_tps, spec_tps = n_ref / t_target, n_tokens / t_spec
    return {"draft_tokens": k, **fig, "cost_ratio": c,
            "predicted_speedup": predicted_speedup(fig["acceptance_rate"], k, c),
            "target_tok_s": target_tps, "spec_tok_s": spec_tps,
            "measured_speedup": spec_tps / target_tps,
            "greedy_identical": (out == ref) if sampling.greedy else None}


def read_prompts(tokenizer: Any, prompts_file: str | None, data: str | None,
                 num_prompts: int, prompt_length: int, chat: bool = False) -> list[list[int]]:
    """Token ids of the prompts: lines (or JSONL ``prompt``/``text`` fields) of a file, or the
    first ``prompt_length`` tokens of the last ``num_prompts`` long-enough documents of an
    indexed dataset (the end of a dataset is its held-out part under the usual split).
    ``chat``: each line of the file is a user turn in the chat format ``generate --chat`` uses.
    """
    import json

    if (prompts_file is None) == (data is None):
        raise ConfigError("give exactly one of --prompts FILE and --data PREFIX")
    if chat and data is not None:
        raise ConfigError("--chat needs --prompts FILE: --data prompts are windows of "
                          "documents, not user turns")
    if num_prompts < 1 or prompt_length < 1:
        raise ConfigError(f"--num-prompts={num_prompts} and --prompt-length={prompt_length} "
                          "must be at least 1")
    if data is not None:
        from nemo_minitron.data.indexed import check_indexed_prefix, read_indexed_documents
        from nemo_minitron.data.resolve import check_prefix_tokenizer

        check_indexed_prefix(data, "--data")
        check_prefix_tokenizer(data, tokenizer, "--data", "the target's tokenizer")
        docs = [d[:prompt_length].tolist() for d in read_indexed_documents(data)
                if len(d) >= prompt_length]
        if len(docs) < num_prompts:
            raise ConfigError(f"--data={data!r} holds {len(docs)} documents of at least "
                              f"{prompt_length} tokens, fewer than --num-prompts={num_prompts}")
        return docs[-num_prompts:]
    assert prompts_file is not None
    p = Path(prompts_file)
    if not p.is_file():
        raise ConfigError(f"--prompts={prompts_file!r} does not exist")
    texts = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{prompts_file}:{lineno} is not valid JSON") from None
            text = rec.get("prompt", rec.get("text")) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise ConfigError(f"{prompts_file}:{lineno} has no string field 'prompt'")
            line = text
        texts.append(line)
    texts = texts[:num_prompts]
    if chat:
        from nemo_minitron.eval.generate import chat_prompts

        texts = chat_prompts(tokenizer, texts)
    return [tokenizer.encode(t) for t in texts]


def specdec(target: str, draft: str, prompts_file: str | None, data: str | None,
            sampling: SamplingConfig, cfg: SpecDecConfig, *, num_prompts: int = 8,
            prompt_length: int = 32, parallel: ParallelConfig | None = None,
            chat: bool = False) -> list[dict[str, Any]]:
    """One row of figures per K of ``cfg.draft_tokens`` (``chat``: see ``read_prompts``)."""
    from nemo_minitron.checkpoint.io import load_checkpoint_tokenizer, load_model_config

    # Every check before Megatron starts: bad input fails fast with one line.
    parallel = parallel or ParallelConfig()
    check_pair(target, draft)
    check_parallel(parallel)
    prompts = read_prompts(load_checkpoint_tokenizer(target), prompts_file, data, num_prompts,
                           prompt_length, chat)
    check_prompts(prompts, sampling.max_new_tokens,
                  {f"target {target!r}": load_model_config(target).seq_length,
                   f"draft {draft!r}": load_model_config(draft).seq_length})
    t_model, d_model, tok = load_models(target, draft, parallel)
    c = cost_ratio(t_model, d_model, _batches(prompts, cfg.batch_size)[0],
                   sampling.max_new_tokens)
    rows = []
    for i, k in enumerate(cfg.draft_tokens):
        rows.append(measure(t_model, d_model, prompts, sampling, k, cfg, tok.vocab_size, c))
        log.info("K=%d (%d/%d): acceptance %.3f, mean length %.2f, speed-up %.2fx "
                 "(predicted %.2fx)", k, i + 1, len(cfg.draft_tokens),
                 rows[-1]["acceptance_rate"], rows[-1]["mean_acceptance_length"],
                 rows[-1]["measured_speedup"], rows[-1]["predicted_speedup"])
    return rows


def specdec_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the sweep."""
    from nemo_minitron.eval.table import markdown_table

    k_max = max(r["draft_tokens"] for r in rows)
    header = ["K", "acceptance rate", "mean acceptance length", "acceptance by position 1..K",
              "c", "predicted speed-up", "measured speed-up", "target tok/s", "spec tok/s"]
    cells = [[str(r["draft_tokens"]), f"{r['acceptance_rate']:.3f}",
              f"{r['mean_acceptance_length']:.2f}",
              " ".join("-" if a is None else f"{a:.2f}"
                       for a in r["acceptance_by_position"][:k_max]),
              f"{r['cost_ratio']:.2f}", f"{r['predicted_speedup']:.2f}",
              f"{r['measured_speedup']:.2f}", f"{r['target_tok_s']:.1f}",
              f"{r['spec_tok_s']:.1f}"] for r in rows]
    return markdown_table(header, cells, text_columns={3})


def plot_sweep(rows: list[dict[str, Any]], out_png: str | Path) -> Path:
    """Two panels: conditional acceptance by draft position (one line per K); measured and
    predicted speed-up against K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        acc = r["acceptance_by_position"]
        xs = [i + 1 for i, a in enumerate(acc) if a is not None]
        a1.plot(xs, [a for a in acc if a is not None], "o-", label=f"K={r['draft_tokens']}")
    a1.xaxis.set_major_locator(MaxNLocator(integer=True))
    a1.set_xlabel("draft position")
    a1.set_ylabel("conditional acceptance")
    a1.set_ylim(0, 1.05)
    a1.legend()
    ks = [r["draft_tokens"] for r in rows]
    a2.plot(ks, [r["measured_speedup"] for r in rows], "o-", label="measured")
    a2.plot(ks, [r["predicted_speedup"] for r in rows], "s--", label="predicted")
    a2.axhline(1.0, color="grey", lw=0.8)
    a2.set_xscale("log", base=2)
    a2.set_xticks(ks, [str(k) for k in ks])
    a2.set_xlabel("draft tokens K")
    a2.set_ylabel("speed-up over the target alone")
    a2.legend()
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = Path(f"{out_png}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(out_png)
    return Path(out_png)

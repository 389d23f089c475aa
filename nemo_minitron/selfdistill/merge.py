"""The end of a ``self-distill`` run (rank 0): the generated shards -> filters -> the output
JSONL in input order, the stats JSON, and the shard directory removed."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from nemo_minitron.config import ConfigError
from nemo_minitron.data.instruct import Example, write_jsonl
from nemo_minitron.selfdistill.filters import REASONS, Verifier, rejection
from nemo_minitron.selfdistill.prompt import instruction_of
from nemo_minitron.utils.fs import atomic_write_json
from nemo_minitron.utils.logging import get_logger

log = get_logger("self-distill")


def read_parts(parts: Path, batches: list[list[int]]) -> dict[int, list[int]]:
    """Generated token ids (the stop token included when reached) per example index."""
    generated: dict[int, list[int]] = {}
    for k, batch in enumerate(batches):
        path = parts / f"batch_{k:06d}.jsonl"
        rows = {r["index"]: r["ids"] for r in map(json.loads, path.read_text().splitlines())}
        if sorted(rows) != sorted(batch):
            raise ConfigError(f"{path} does not hold batch {k}; remove {parts} to start over")
        generated.update(rows)
    return generated


def _mean(xs: list[int]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def merge(examples: list[Example], prompts: list[list[int]], batches: list[list[int]],
          parts: Path, tok: Any, cfg: Any, verifier: Verifier | None, out: Path,
          stats_file: Path) -> dict[str, Any]:
    """Filter the rewrites, write ``stats_file`` then ``out`` (atomically), remove ``parts``."""
    generated = read_parts(parts, batches)
    final: list[Example] = []
    reasons: Counter[str] = Counter()
    rejected: list[dict[str, Any]] = []
    lengths: dict[str, list[int]] = {"original": [], "rewrite": [], "kept_rewrite": [],
                                     "prompt": [], "output": []}
    for i, e in enumerate(examples):
        original = len(tok.encode(e.response))
        lengths["original"].append(original)
        text = None
        if i not in generated:
            reason: str | None = "too_long"
        else:
            ids = generated[i]
            # generate drops the stop token: a row that filled max_new_tokens never stopped
            truncated = len(ids) >= cfg.sampling.max_new_tokens
            body = ids
            text = tok.decode(body).strip()
            lengths["rewrite"].append(len(body))
            lengths["prompt"].append(len(prompts[i]))
            try:
                reason = rejection(text, truncated=truncated, instruction=instruction_of(e),
                                   reference=e.response, verifier=verifier)
            except Exception as err:  # a user verifier's bug: the shards stay for a rerun
                raise ConfigError(f"verifier={cfg.verifier!r} failed on the example at line "
                                  f"{e.line}: {type(err).__name__}: {err}") from None
            if reason is None:
                lengths["kept_rewrite"].append(len(body))
        if reason is None:
            final.append(e.with_response(text or ""))
            lengths["output"].append(lengths["rewrite"][-1])
        else:
            final.append(e)
            lengths["output"].append(original)
            reasons[reason] += 1
            rejected.append({"line": e.line, "reason": reason, "rewrite": text})
    kept = len(examples) - sum(reasons.values())
    stats = {"examples": len(examples), "kept": kept, "rejected": sum(reasons.values()),
             "acceptance_rate": kept / len(examples),
             "rejected_by_reason": {r: reasons.get(r, 0) for r in REASONS},
             "mean_tokens": {k: _mean(v) for k, v in lengths.items()},
             "settings": {**cfg.generation_settings(), "verifier": cfg.verifier},
             "rejections": rejected}
    atomic_write_json(stats_file, stats)
    write_jsonl(out, final)
    shutil.rmtree(parts)
    log.info("self-distill: kept %d of %d rewrites (%.1f%%); rejected %s; wrote %s and %s",
             kept, len(examples), 100 * stats["acceptance_rate"],
             {r: n for r, n in stats["rejected_by_reason"].items() if n}, out, stats_file)
    return stats

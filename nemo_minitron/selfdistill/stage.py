"""``self-distill``: the teacher rewrites every response of an instruction data set.

Batches are fixed by the data alone (examples sorted by prompt length, stable, then cut every
``batch_size``), and batch ``k`` samples with seed ``seed + k``, so the output does not depend
on the number of ranks or on interruptions. Data-parallel rank ``r`` generates every ``dp``-th
unfinished batch from the ``r``-th on; each finished batch is written at once (atomically) to
``OUT.parts/batch_<k>.jsonl``, the run's shard directory. A restarted run skips the batches
found there (nothing is generated twice; the settings must be the same, ``OUT.parts/meta.json``)
and deals the remaining ones out afresh, so a restart on another number of ranks works too.
When every batch is done, rank 0 applies the filters (``selfdistill.filters``), writes the stats
file and then OUT (atomically), in input order, and removes ``OUT.parts``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nemo_minitron.config import ConfigError, ParallelConfig
from nemo_minitron.eval.generate import SamplingConfig
from nemo_minitron.selfdistill.prompt import DEFAULT_REWRITE_TEMPLATE, check_template
from nemo_minitron.utils.logging import fmt_duration, get_logger

log = get_logger("self-distill")

REWRITE_SAMPLING: dict[str, Any] = {"max_new_tokens": 512, "greedy": False,
                                    "temperature": 0.7, "top_p": 0.95}
"""Self-distill's decoding defaults where they differ from ``SamplingConfig``'s (common
instruction-model sampling)."""


def rewrite_sampling(**given: Any) -> SamplingConfig:
    """A ``SamplingConfig`` with self-distill's defaults, ``given`` fields overriding them."""
    return SamplingConfig(**{**REWRITE_SAMPLING, **given})


@dataclass(kw_only=True)
class SelfDistillConfig:
    """How the teacher rewrites the responses."""

    sampling: SamplingConfig = field(default_factory=rewrite_sampling)
    """How the teacher decodes (``eval.generate.SamplingConfig``; defaults:
    ``rewrite_sampling()``). A rewrite that reaches ``max_new_tokens`` is rejected; batch ``k``
    samples with seed ``seed + k``; ``stop_tokens`` None: the tokenizer's end-of-sequence
    tokens."""
    batch_size: int = 8
    """Prompts generated together (KV cache of the batch)."""
    prompt_template: str = DEFAULT_REWRITE_TEMPLATE
    """The rewrite prompt, ``{instruction}`` and ``{reference}`` fields (see ``prompt``)."""
    verifier: str | None = None
    """Task check of a rewrite: ``math``, ``code`` or ``module:function`` (see ``filters``)."""
    stats: str | None = None
    """Stats JSON path; None: next to OUT, ``<OUT stem>.stats.json``."""

    def __post_init__(self) -> None:
        # SamplingConfig checks its own fields; a rewrite needs at least one token.
        for name, value in (("max_new_tokens", self.sampling.max_new_tokens),
                            ("batch_size", self.batch_size)):
            if value < 1:
                raise ConfigError(f"{name}={value} must be >= 1")
        check_template(self.prompt_template)

    def generation_settings(self) -> dict[str, Any]:
        """What decides the generated tokens (a restart must keep them); the sampling fields
        at the top level, as runs before ``sampling`` was nested wrote them."""
        return {**asdict(self.sampling), "batch_size": self.batch_size,
                "prompt_template": self.prompt_template}

    def batch_sampling(self, k: int, eos_ids: list[int]) -> SamplingConfig:
        """The decoding of batch ``k``: seed ``seed + k``, stopping at ``stop_tokens`` or, when
        None, at the tokenizer's end-of-sequence tokens ``eos_ids``."""
        s = self.sampling
        return replace(s, seed=s.seed + k,
                       stop_tokens=eos_ids if s.stop_tokens is None else s.stop_tokens)


def stats_path(out: str | os.PathLike[str], cfg: SelfDistillConfig) -> Path:
    """Where the stats JSON goes."""
    if cfg.stats:
        return Path(cfg.stats)
    out = Path(out)
    return out.with_name(f"{out.stem}.stats.json")


def parts_dir(out: str | os.PathLike[str]) -> Path:
    """The shard directory of an unfinished run."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def plan_batches(lengths: list[int], fits: list[int], batch_size: int) -> list[list[int]]:
    """Example indices per batch: ``fits`` sorted by prompt length (stable), cut in order."""
    order = sorted(fits, key=lambda i: lengths[i])
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def _check_student(teacher_tok: Any, student: str) -> None:
    from nemo_minitron.checkpoint.io import check_checkpoint, load_checkpoint_tokenizer
    from nemo_minitron.data.tokenizer import same_tokenizer, tokenizer_label

    check_checkpoint(student, "student")
    other = load_checkpoint_tokenizer(student)
    if not same_tokenizer(teacher_tok, other):
        raise ConfigError(f"the teacher's tokenizer differs from the student's ({student}): "
                          f"{tokenizer_label(teacher_tok)} vs {tokenizer_label(other)}; the "
                          "rewrites would be fine-tuned in other tokens")


def _open_parts(parts: Path, settings: dict[str, Any], batches: int) -> set[int]:
    """Rank 0: create ``parts`` or check it belongs to this run; the finished batches."""
    from nemo_minitron.utils.fs import atomic_write_json

    meta = parts / "meta.json"
    if meta.exists():
        have = json.loads(meta.read_text())
        diff = [k for k in sorted(set(have) | set(settings)) if have.get(k) != settings.get(k)]
        if diff:
            raise ConfigError(f"{parts} holds an unfinished run with other settings ({diff[0]}: "
                              f"{have.get(diff[0])!r} there, {settings.get(diff[0])!r} now); "
                              "rerun with the same settings or remove it")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta, settings)
    names = (re.fullmatch(r"batch_(\d{6})\.jsonl", p.name) for p in parts.iterdir())
    # Temp files of a killed write start with "." and do not match.
    return {int(m[1]) for m in names if m and int(m[1]) < batches}


def self_distill(teacher: str, data: str, out: str, cfg: SelfDistillConfig,
                 parallel: ParallelConfig | None = None,
                 student: str | None = None) -> dict[str, Any] | None:
    """Rewrite every response of ``data`` with ``teacher``; write ``out`` and the stats file.
    Returns the stats on rank 0 (None elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_minitron.checkpoint.io import (
        check_checkpoint,
        load_checkpoint_tokenizer,
        load_model_config,
        load_weights,
    )
    from nemo_minitron.data.instruct import read_jsonl, render_prompt
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.selfdistill.filters import load_verifier
    from nemo_minitron.selfdistill.prompt import rewrite_messages

    # Every check before torch.distributed starts: bad input leaves nothing behind.
    for path in (Path(out), stats_path(out, cfg)):
        if path.exists():
            raise ConfigError(f"output {str(path)!r} already exists")
    check_checkpoint(teacher, "teacher")
    examples = read_jsonl(data)
    verifier = load_verifier(cfg.verifier)
    parallel = parallel or ParallelConfig()
    if parallel.pipeline_model_parallel_size != 1:
        raise ConfigError("self-distill generates with parallel.pipeline_model_parallel_size=1 "
                          "(use tensor and data parallelism)")
    tok = load_checkpoint_tokenizer(teacher)
    model_cfg = load_model_config(teacher)
    prompts = [tok.encode(render_prompt(tok, rewrite_messages(e, cfg.prompt_template)))
               for e in examples]
    if student is not None:
        _check_student(tok, student)
    limit = model_cfg.seq_length - cfg.sampling.max_new_tokens
    fits = [i for i, p in enumerate(prompts) if 0 < len(p) <= limit]
    if not fits:
        raise ConfigError(f"{data}: every rewrite prompt is longer than the teacher's "
                          f"seq_length {model_cfg.seq_length} - max_new_tokens "
                          f"{cfg.sampling.max_new_tokens} = {limit} tokens (the shortest has "
                          f"{min(len(p) for p in prompts)})")
    batches = plan_batches([len(p) for p in prompts], fits, cfg.batch_size)
    settings = {**cfg.generation_settings(), "teacher": str(Path(teacher).resolve()),
                "data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
                "examples": len(examples)}
    rt = init_distributed(parallel)
    parts = parts_dir(out)
    box: list[Any] = [None]
    if rt.rank == 0:
        try:
            box[0] = sorted(_open_parts(parts, settings, len(batches)))
        except ConfigError as e:
            box[0] = str(e)
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise ConfigError(box[0])
    done = set(box[0])
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = [k for k in range(len(batches)) if k not in done][dp_rank::dp]
    log.info("self-distill: %d examples (%d too long for the teacher), %d batches, %d already "
             "done; %d on each of %d data-parallel ranks", len(examples),
             len(examples) - len(fits), len(batches), len(done), len(mine), dp)
    if len(done) < len(batches):  # every rank loads: checkpoint loading is collective
        model = build_model(model_cfg)
        load_weights(teacher, model)
        _generate_batches(model, tok, prompts, batches, mine, cfg, parts,
                          writer=ps.get_tensor_model_parallel_rank() == 0)
    dist.barrier()
    if rt.rank != 0:
        return None
    from nemo_minitron.selfdistill.merge import merge

    return merge(examples, prompts, batches, parts, tok, cfg, verifier, Path(out),
                 stats_path(out, cfg))


def _generate_batches(model: Any, tok: Any, prompts: list[list[int]],
                      batches: list[list[int]], mine: list[int], cfg: SelfDistillConfig,
                      parts: Path, writer: bool) -> None:
    """Generate this rank's batches, each written to ``parts`` as soon as it is done."""
    from nemo_minitron.eval.generate import generate  # looked up per run (tests count calls)
    from nemo_minitron.utils.fs import atomic_write_text

    total = sum(len(batches[k]) for k in mine)
    t0, n = time.perf_counter(), 0
    for j, k in enumerate(mine):
        ids = generate(model, [prompts[i] for i in batches[k]],
                       cfg.batch_sampling(k, tok.eos_ids),
                       vocab_limit=tok.vocab_size)
        if writer:
            atomic_write_text(parts / f"batch_{k:06d}.jsonl", "".join(
                json.dumps({"index": i, "ids": row}) + "\n" for i, row in zip(batches[k], ids)))
        n += len(batches[k])
        rate = n / (time.perf_counter() - t0)
        log.info("batch %d/%d of this rank: %d/%d examples, %.2f examples/s, eta %s", j + 1,
                 len(mine), n, total, rate, fmt_duration((total - n) / rate))

"""``merge``: checks, the plan of output items, their division among the ranks, and the
streamed write of the merged checkpoint.

Unit of work: one layer slice of one stored key (``decoder.layers.*`` keys hold every layer
along a leading axis), read whole from every input whatever TP/PP layout it was saved under,
so the dot products and norms of a logical tensor always cover all of it: no rank ever holds a
TP shard of it, so there is nothing to all-reduce. Within it, each logical tensor (q, k, v of
``linear_qkv``; gate, up of ``linear_fc1``) is merged on its own, named and split by the
interop layout (``hf_views``), the same granularity as mergekit on the exported model.

Memory of a rank: the item being merged from every input (the result overwrites the first)
plus one stored chunk while reading and bounded scratch: about ``n_inputs + 1`` times the
largest item for slerp and linear, never the model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from nemo_minitron.checkpoint.io import (
    MODEL_CONFIG,
    check_checkpoint,
    has_tokenizer,
    load_checkpoint_tokenizer,
    load_metadata,
    load_model_config,
    verify_checkpoint,
)
from nemo_minitron.checkpoint.layout import TOKENIZER, WEIGHTS, weights_dir
from nemo_minitron.checkpoint.writer import checkpoint_writer
from nemo_minitron.config import ConfigError, to_dict
from nemo_minitron.data.tokenizer import Tokenizer, same_tokenizer, tokenizer_label
from nemo_minitron.interop.hf_weights import hf_views
from nemo_minitron.merge.config import MergeConfig, evaluate, filters
from nemo_minitron.merge.methods import linear_, slerp_, task_
from nemo_minitron.merge.store import CheckpointReader, OutChunk, write_weights
from nemo_minitron.model.layouts import split_layer_key
from nemo_minitron.utils.logging import get_logger, warn_once

log = get_logger("merge")

_STACKED = "decoder.layers."
_MEGATRON_FILES = ("metadata.json", "common.pt")  # copied from --base (layout independent)


METADATA_KEY = "merge"
"""The key of a merged checkpoint's metadata that records how it was made."""
_OLD_RECORD = "merge.json"  # where merges before the checkpoint writer recorded it


def merge_record(ckpt: str | os.PathLike[str]) -> dict[str, Any] | None:
    """How a merged checkpoint was made (method and settings, inputs, colinear fallbacks);
    None for a checkpoint that is not a merge. Reads older merges' ``merge.json`` too."""
    record = load_metadata(ckpt).get(METADATA_KEY)
    old = Path(ckpt) / _OLD_RECORD
    if record is None and old.is_file():
        record = json.loads(old.read_text())
    return record


def _tokenizer(ckpt: Path) -> Tokenizer | None:
    return load_checkpoint_tokenizer(ckpt) if has_tokenizer(ckpt) else None


def check_inputs(paths: dict[str, Path]
                 ) -> tuple[Any, dict[str, CheckpointReader], Tokenizer | None]:
    """Same model config, tokenizer and stored tensors (shapes, dtypes) in every input;
    returns the config, one reader per input and the tokenizer."""
    (base_field, base), *rest = paths.items()
    for p in paths.values():  # checksums first: a corrupt input is a one-line error
        # Collective: under torchrun each rank hashes a share of the files.
        verify_checkpoint(p, (MODEL_CONFIG, TOKENIZER, WEIGHTS), collective=True)
    cfg = load_model_config(base)
    want = to_dict(cfg)
    tok = _tokenizer(base)
    readers = {base_field: CheckpointReader(weights_dir(base))}
    for field, p in rest:
        r = readers[field] = CheckpointReader(weights_dir(p))
        ref = readers[base_field].tensors
        for key in list(ref) + [k for k in r.tensors if k not in ref]:
            x, y = ref.get(key), r.tensors.get(key)
            if x != y:
                def desc(i: Any) -> str:
                    return "absent" if i is None else f"{list(i.shape)} {i.dtype}"
                raise ConfigError(f"{field}={str(p)!r}: tensor {key!r} is {desc(y)}, in "
                                  f"{base_field} {desc(x)}: merged models must have one shape")
        have = to_dict(load_model_config(p))
        diff = next((k for k in want if want[k] != have.get(k)), None)
        if diff is not None:
            raise ConfigError(f"{field}={str(p)!r} has model.{diff}={have.get(diff)!r}, "
                              f"{base_field} has {want[diff]!r}: merged models must have one "
                              f"architecture")
        other = _tokenizer(p)
        if (tok is None) != (other is None) or (
                tok is not None and other is not None and not same_tokenizer(tok, other)):
            def label(t: Tokenizer | None) -> str:
                return "none" if t is None else tokenizer_label(t)
            raise ConfigError(f"{field}={str(p)!r} has a different tokenizer from "
                              f"{base_field}: {label(other)} vs {label(tok)}")
    return cfg, readers, tok


def plan_chunks(reader: CheckpointReader, num_layers: int) -> list[OutChunk]:
    """One output item per layer slice of a stacked key, one per other tensor."""
    out = []
    for key, info in reader.tensors.items():
        zeros = (0,) * len(info.shape)
        if key.startswith(_STACKED) and info.shape and info.shape[0] == num_layers:
            for i in range(num_layers):
                out.append(OutChunk(key, info.shape, info.dtype, (i,) + zeros[1:],
                                    (1,) + info.shape[1:]))
        else:
            out.append(OutChunk(key, info.shape, info.dtype, zeros, info.shape))
    return out


def assign(chunks: list[OutChunk], world: int) -> list[list[OutChunk]]:
    """Divide the items among ``world`` ranks, largest first to the least loaded rank."""
    loads = [0] * world
    per_rank: list[list[OutChunk]] = [[] for _ in range(world)]
    for c in sorted(chunks, key=lambda c: (-c.dtype.itemsize * _numel(c.sizes), c.key,
                                           c.offsets)):
        r = loads.index(min(loads))
        per_rank[r].append(c)
        loads[r] += c.dtype.itemsize * _numel(c.sizes)
    return per_rank


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class TensorMerger:
    """The merged value of each logical tensor of a model's full tensors: the one owner of the
    merge arithmetic, shared by the streamed verb (``Merger``) and the in-memory merge
    (``merge.memory``)."""

    def __init__(self, cfg: MergeConfig, model_cfg: Any, n_inputs: int):
        self.cfg, self.model_cfg, self.n_inputs = cfg, model_cfg, n_inputs
        self.matched: set[str] = set()
        self.colinear = 0

    def views(self, key: str, w: torch.Tensor) -> tuple[list[tuple[str, torch.Tensor]], float]:
        """(the logical tensors of the full tensor ``key`` (global layer numbers) with their HF
        names, as views of ``w``; its relative layer depth: 0 outside the layers)."""
        n = self.model_cfg.num_layers
        parsed = split_layer_key(key)
        depth = 0.0 if parsed is None else parsed[0] / (n - 1) if n > 1 else 1.0
        try:
            views = hf_views(key, w, self.model_cfg)
        except ConfigError:
            views = []
        return (views or [(key, w)]), depth

    def _param(self, setting: Any, name: str, depth: float, field: str) -> float:
        for f in filters(setting):
            if f in name:
                self.matched.add(f)
        v = evaluate(setting, name, depth)
        if v is None:
            raise ConfigError(f"no rule of {field} matches tensor {name!r} (add a rule with "
                              f"filter: '*' as the fallback)")
        return v

    def params(self, name: str, depth: float) -> tuple[float, list[float]]:
        """(t, weights) of the logical tensor ``name`` at relative layer depth ``depth``."""
        m = self.cfg
        t = self._param(m.t, name, depth, "merge.t") if m.method == "slerp" or \
            m.combine == "slerp" else 0.0
        n = self.n_inputs - (0 if m.method == "linear" else 1)
        ws = [self._param(w, name, depth, f"merge.weights[{j}]")
              for j, w in enumerate(m.weights or [1.0] * n)] if m.method != "slerp" else []
        return t, ws

    def unused_filters(self) -> list[str]:
        """Name filters of ``t`` and the weights that matched no tensor so far."""
        m = self.cfg
        return sorted({f for s in [m.t, *(m.weights or [])] for f in filters(s)} - self.matched)

    def merge_views(self, parts: list[list[tuple[str, torch.Tensor]]], depth: float) -> None:
        """Merge every logical tensor of one full tensor in place into the first input's views
        (``parts``: ``views`` of each input, base first)."""
        m = self.cfg
        for i, (name, _) in enumerate(parts[0]):
            views = [p[i][1] for p in parts]
            if not views[0].is_floating_point():
                continue  # nothing to interpolate: keep the base
            t, ws = self.params(name, depth)
            if m.method == "slerp":
                self.colinear += slerp_(t, views[0], views[1], dot_threshold=m.dot_threshold,
                                        eps=m.eps)
            elif m.method == "linear":
                linear_(views, ws, True if m.normalize is None else m.normalize)
            elif m.combine == "slerp":
                self.colinear += slerp_(t, views[1], views[2], dot_threshold=m.dot_threshold,
                                        eps=m.eps, origin=views[0])
                views[0].copy_(views[1])
            else:
                task_(views[0], views[1:], ws, bool(m.normalize), m.scale)


class Merger(TensorMerger):
    """Computes the merged value of one output item of the streamed merge."""

    def __init__(self, cfg: MergeConfig, model_cfg: Any, readers: list[CheckpointReader]):
        super().__init__(cfg, model_cfg, len(readers))
        self.readers = readers
        self.bytes_read = 0

    def _names(self, c: OutChunk, w: torch.Tensor) -> tuple[list[tuple[str, torch.Tensor]],
                                                             float]:
        """(logical tensors with their HF names as views of ``w``, relative layer depth)."""
        if c.sizes != c.shape:  # a layer slice of a stacked key
            return self.views(f"{_STACKED}{c.offsets[0]}.{c.key[len(_STACKED):]}", w[0])
        return self.views(c.key, w)

    def precheck(self, chunks: list[OutChunk]) -> None:
        """Evaluate every parameter of every logical tensor before anything is written
        (shapes only: meta tensors), so a rule error stops the merge up front."""
        for c in chunks:
            views, depth = self._names(c, torch.empty(c.sizes, dtype=c.dtype, device="meta"))
            for name, _ in views:
                self.params(name, depth)

    def __call__(self, c: OutChunk) -> torch.Tensor:
        """The merged item (resizable storage: the writer frees it once written)."""
        # The first input becomes the result: a fresh (resizable) allocation, read while
        # nothing else is held; the others are read without a copy.
        tensors = [r.read(c.key, c.offsets, c.sizes, resizable=i == 0)
                   for i, r in enumerate(self.readers)]
        self.bytes_read += sum(t.numel() * t.element_size() for t in tensors)
        parts = [self._names(c, t) for t in tensors]
        self.merge_views([p[0] for p in parts], parts[0][1])
        return tensors[0]


def merge_checkpoints(base: str | os.PathLike[str], others: list[str],
                      out: str | os.PathLike[str], cfg: MergeConfig) -> dict[str, Any]:
    """Merge ``base`` and ``others`` into the checkpoint ``out`` (collective under torchrun:
    the items are divided among the ranks). Returns a summary."""
    import torch.distributed as dist

    cfg.check_inputs(len(others))
    final = Path(out)
    if final.exists():
        raise ConfigError(f"--out {str(out)!r} already exists")
    paths = {"--base": check_checkpoint(base, "--base")}
    for i, o in enumerate(others):
        paths[f"--other[{i}]" if len(others) > 1 else "--other"] = check_checkpoint(o, "--other")
    seen: dict[Path, str] = {}
    for field, p in paths.items():
        if p.resolve() in seen:
            warn_once(log, f"{field} and {seen[p.resolve()]} are the same checkpoint ({p}): a "
                      f"model is merged with itself")
        seen.setdefault(p.resolve(), field)
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from nemo_minitron.config import ParallelConfig
        from nemo_minitron.parallel.runtime import init_distributed

        init_distributed(ParallelConfig())
        rank = dist.get_rank()
    model_cfg, readers, tok = check_inputs(paths)
    base_reader = readers["--base"]
    chunks = plan_chunks(base_reader, model_cfg.num_layers)
    mine = assign(chunks, world)[rank]
    merger = Merger(cfg, model_cfg, list(readers.values()))
    merger.precheck(chunks)
    if rank == 0:
        unused = sorted({f for s in [cfg.t, *(cfg.weights or [])] for f in filters(s)}
                        - merger.matched)
        for f in unused:
            log.warning("merge rule filter %r matches no tensor", f)
    total, done, start = len(mine), 0, time.perf_counter()

    def compute(c: OutChunk) -> torch.Tensor:
        nonlocal done
        result = merger(c)
        done += 1
        if done == total or done % max(1, total // 10) == 0:
            el = time.perf_counter() - start
            log.info("merged %d/%d items, %.2f GB/s read, ETA %.0fs", done, total,
                     merger.bytes_read / max(el, 1e-9) / 1e9, el / done * (total - done))
        return result

    byte_items = {} if rank else {k: (lambda k=k: base_reader.read_bytes(k))
                                  for k in base_reader.byte_items}
    # The record is complete only after the write; the writer serializes it at the end.
    record: dict[str, Any] = {"merge": to_dict(cfg), "base": str(base),
                              "others": [str(o) for o in others]}
    with checkpoint_writer(final, model_cfg=model_cfg, tokenizer=tok,
                           metadata={METADATA_KEY: record}) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                write_weights(weights_dir(tmp), mine, compute, byte_items)
        except BaseException as e:
            # torch.distributed.checkpoint wraps errors raised while writing; a user error
            # (e.g. an input that does not cover a tensor) stays one line.
            for failure in getattr(e, "failures", {}).values():
                inner = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(inner, ConfigError):
                    raise inner from None
            raise
        counts = torch.tensor([merger.colinear, merger.bytes_read], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(counts)
        record["colinear_fallbacks"] = int(counts[0])
        if rank == 0:
            for f in _MEGATRON_FILES:
                shutil.copyfile(weights_dir(paths["--base"]) / f, weights_dir(tmp) / f)
    log.info("merged %d inputs (%s) into %s", len(paths), cfg.method, final)
    return {"method": cfg.method, "out": str(final), "items": len(chunks),
            "colinear_fallbacks": int(counts[0]), "bytes_read": int(counts[1]),
            "seconds": round(time.perf_counter() - start, 3)}

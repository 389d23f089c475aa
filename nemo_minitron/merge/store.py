"""Stream tensors out of and into Megatron distributed checkpoints (``torch_dist`` format),
one layer slice at a time.

Megatron saves every ``decoder.layers.*`` weight under one key with the layer number as a
leading axis (``[num_layers, *shape]``) and every tensor at its full TP=1 layout (global
shape), split into chunks by whoever saved it (one per TP rank and layer, SwiGLU ``fc1`` as
separate gate and up chunks). A region read therefore gives the same tensor whatever TP/PP
layout the checkpoint was saved under.

Reading: ``.metadata`` and byte items (pickles) are vetted by ``checkpoint.safety``
before torch reads it. Each stored chunk is a ``torch.save`` archive at a byte range of a
``.distcp`` file; it is loaded with ``torch.load(weights_only=True)`` through a window onto
that range, which ``readinto``\\ s straight into the new tensor's storage (no intermediate
bytes), so reading a region costs the region plus at most one chunk.

Writing: a ``torch.distributed.checkpoint`` save whose planner describes the output chunks
up front (one chunk per layer slice) and computes each one only when the writer asks for it
(``resolve_data``), so the output is written tensor by tensor, each rank its own items.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemo_minitron.config import ConfigError


class _Window(io.RawIOBase):
    """A read-only view of ``length`` bytes at ``start`` of an open file."""

    def __init__(self, f: io.BufferedReader, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, min(self.length, base + pos))
        return self.pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.length - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b).cast("B")[:n])
        self.pos += got or 0
        return got or 0


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: its global shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class CheckpointReader:
    """The tensors of one ``weights/`` distributed checkpoint, read region by region."""

    def __init__(self, weights_dir: str | os.PathLike[str]):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        from nemo_minitron.checkpoint.safety import verify_dist_checkpoint

        self.dir = Path(weights_dir)
        # Untrusted input: torch unpickles .metadata and byte items; vet both first.
        verify_dist_checkpoint(self.dir)
        meta = FileSystemReader(str(self.dir)).read_metadata()
        self.tensors: dict[str, TensorInfo] = {}
        self.byte_items: list[str] = []
        for key, md in meta.state_dict_metadata.items():
            if isinstance(md, BytesStorageMetadata):
                self.byte_items.append(key)
            else:
                self.tensors[key] = TensorInfo(tuple(md.size), md.properties.dtype)
        # key -> [(chunk offsets, chunk sizes, file, byte offset, byte length)]
        self.chunks: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], str, int, int]]] = {}
        self.bytes_at: dict[str, tuple[str, int, int]] = {}
        for index, info in meta.storage_data.items():
            if getattr(info, "transform_descriptors", None):
                raise ConfigError(f"{str(self.dir)!r} stores {index.fqn!r} with transforms "
                                  f"{info.transform_descriptors} (only plain torch_dist)")
            if index.fqn in self.tensors:
                md = meta.state_dict_metadata[index.fqn]
                chunk = md.chunks[index.index] if index.index is not None else None
                if chunk is None or tuple(chunk.offsets) != tuple(index.offset):
                    chunk = next(c for c in md.chunks
                                 if tuple(c.offsets) == tuple(index.offset))
                self.chunks.setdefault(index.fqn, []).append(
                    (tuple(chunk.offsets), tuple(chunk.sizes), info.relative_path, info.offset,
                     info.length))
            else:
                self.bytes_at[index.fqn] = (info.relative_path, info.offset, info.length)

    def _load_chunk(self, file: str, offset: int, length: int) -> torch.Tensor:
        with open(self.dir / file, "rb") as f:
            return torch.load(_Window(f, offset, length), map_location="cpu", weights_only=True)

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...],
             resizable: bool = False) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of tensor ``key`` (a new tensor). A
        stored chunk that is the region is returned as loaded (no copy) unless ``resizable``:
        then the region is always a fresh allocation whose storage can be freed early."""
        info = self.tensors[key]
        out: torch.Tensor | None = None
        covered = 0
        for c_off, c_size, file, start, length in self.chunks[key]:
            lo = [max(a, b) for a, b in zip(offsets, c_off)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, sizes, c_off, c_size)]
            if any(h <= lo_ for lo_, h in zip(lo, hi)):
                continue
            chunk = self._load_chunk(file, start, length)
            if tuple(c_off) == tuple(offsets) and tuple(c_size) == tuple(sizes) \
                    and not resizable:
                return chunk.reshape(sizes)  # the stored chunk is the region: no copy
            if out is None:
                out = torch.empty(sizes, dtype=info.dtype)
            src = chunk.reshape(c_size)[tuple(slice(a - b, h - b)
                                              for a, h, b in zip(lo, hi, c_off))]
            out[tuple(slice(a - b, h - b) for a, h, b in zip(lo, hi, offsets))] = src
            covered += src.numel()
            del chunk, src
        if out is None or covered != out.numel():
            raise ConfigError(f"{str(self.dir)!r} does not cover all of {key!r}")
        return out

    def read_bytes(self, key: str) -> bytes:
        """A non-tensor item (Megatron's ``_extra_state``), verbatim."""
        file, start, length = self.bytes_at[key]
        with open(self.dir / file, "rb") as f:
            f.seek(start)
            return f.read(length)


@dataclass(frozen=True)
class OutChunk:
    """One output item: region ``[offsets, offsets + sizes)`` of ``key`` (global ``shape``)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def write_weights(weights_dir: str | os.PathLike[str], chunks: list[OutChunk],
                     compute: Callable[[OutChunk], torch.Tensor],
                     byte_items: dict[str, Callable[[], bytes]]) -> None:
    """Collectively write a distributed checkpoint: this rank writes ``chunks`` (each
    computed by ``compute`` when the writer reaches it) and ``byte_items``; the union over the
    ranks must cover every tensor."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import (
        SavePlan,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )

    by_index: dict[MetadataIndex, OutChunk] = {}
    items: list[WriteItem] = []
    for c in chunks:
        index = MetadataIndex(c.key, torch.Size(c.offsets))
        by_index[index] = c
        items.append(WriteItem(
            index=index, type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets),
                                           sizes=torch.Size(c.sizes)),
                properties=TensorProperties(dtype=c.dtype), size=torch.Size(c.shape))))
    for key in byte_items:
        items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))

    class LazyPlanner(DefaultSavePlanner):
        previous: torch.Tensor | None = None

        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items, planner_data={})
            return self.plan

        def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
            if write_item.type == WriteItemType.BYTE_IO:
                return io.BytesIO(byte_items[write_item.index.fqn]())
            c = by_index[MetadataIndex(write_item.index.fqn, write_item.index.offset)]
            if self.previous is not None:
                # The serial writer has written the previous item but still holds it (loop
                # variables): free its memory before computing the next one (``compute``
                # returns resizable storage).
                self.previous.untyped_storage().resize_(0)
            t = compute(c).contiguous()
            self.previous = t
            if tuple(t.shape) != c.sizes or t.dtype != c.dtype:
                raise AssertionError(f"{c.key}: computed {tuple(t.shape)} {t.dtype}, "
                                     f"planned {c.sizes} {c.dtype}")
            return t

    class Writer(FileSystemWriter):
        def storage_meta(self) -> None:
            return None  # torch's would pickle a PosixPath, which readers rightly refuse

    # thread_count=1 and no copy-ahead: items are computed, written and freed one at a time.
    writer = Writer(str(weights_dir), single_file_per_rank=True, thread_count=1,
                    per_thread_copy_ahead=0)
    save({}, storage_writer=writer, planner=LazyPlanner(flatten_state_dict=False),
         no_dist=not dist.is_initialized())

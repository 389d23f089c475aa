"""Loading a distributed checkpoint from someone else without running their code.

torch's ``FileSystemReader`` unpickles ``.metadata`` with plain ``pickle`` and its load planner
unpickles every byte object (``BytesStorageMetadata``: Megatron's ``ShardedObject``, e.g. a
layer's ``_extra_state``) with ``torch.load(weights_only=False)``. ``verify_dist_checkpoint``
runs before every ``dist_checkpointing.load``: it reads ``.metadata`` with an unpickler that
admits only the classes torch writes there (listed from real checkpoints with pickletools),
then checks that every byte object and ``common.pt`` unpickle with torch's weights-only
unpickler. Anything else is a one-line ``ConfigError`` naming the file and the class.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from nemo_minitron.config import ConfigError

_DCP = "torch.distributed.checkpoint."
_ALLOWED: dict[str, set[str]] = {
    _DCP + "metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                        "TensorStorageMetadata", "BytesStorageMetadata",
                        "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    _DCP + "filesystem": {"_StorageInfo"},
    _DCP + "planner": {"SavePlan", "TensorWriteData", "WriteItem", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    "builtins": {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes",
                 "bool", "slice", "complex", "bytearray"},
}


def _allowed(module: str, name: str) -> bool:
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None),
                                            torch.dtype | torch.layout | torch.memory_format)
    return name in _ALLOWED.get(module, ())


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f: Any, path: Path):
        super().__init__(f)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise ConfigError(f"{self._path} references {module}.{name}, which checkpoint "
                              f"metadata never holds; refusing to unpickle it")
        return super().find_class(module, name)


def read_dist_metadata(ckpt_dir: str | Path) -> Any:
    """The ``torch.distributed.checkpoint`` ``Metadata`` of ``ckpt_dir``, read safely."""
    path = Path(ckpt_dir) / ".metadata"
    if not path.is_file():
        raise ConfigError(f"{str(ckpt_dir)!r} is not a distributed checkpoint (no .metadata)")
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f, path).load()
    except ConfigError:
        raise
    except Exception as e:  # truncated or garbage bytes
        raise ConfigError(f"{path} is corrupt ({type(e).__name__}: {e})") from None
    if type(meta).__name__ != "Metadata" or not isinstance(
            getattr(meta, "state_dict_metadata", None), dict):
        raise ConfigError(f"{path} holds a {type(meta).__name__}, not checkpoint metadata")
    return meta


def load_weights_only(data: bytes | Path, what: str) -> Any:
    """``torch.load`` of ``data`` (bytes or a file) with torch's weights-only unpickler; a
    pickled object or a damaged file is a one-line ``ConfigError`` naming ``what``."""
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            return torch.load(io.BytesIO(data) if isinstance(data, bytes) else data,
                              map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        cause = str(e).split("\n")
        found = next((x.strip() for x in cause if "GLOBAL" in x or "Unsupported" in x), cause[0])
        raise ConfigError(f"{what} holds a pickled object that is not plain data ({found}); "
                          f"refusing to unpickle it") from None
    except Exception as e:
        raise ConfigError(f"{what} is corrupt ({type(e).__name__}: {e})") from None


def verify_dist_checkpoint(ckpt_dir: str | Path, *, check_common: bool = True) -> None:
    """Raise ``ConfigError`` unless loading ``ckpt_dir`` unpickles plain data only."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    root = Path(ckpt_dir)
    meta = read_dist_metadata(root)
    storage = meta.storage_data if isinstance(meta.storage_data, dict) else {}
    for key, md in meta.state_dict_metadata.items():
        if not isinstance(md, BytesStorageMetadata):
            continue
        info = storage.get(MetadataIndex(key))
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or "/" in rel or rel.startswith(".") \
                or getattr(info, "transform_descriptors", None):
            raise ConfigError(f"{root / '.metadata'} has an invalid entry for {key!r}")
        try:
            with open(root / rel, "rb") as f:
                f.seek(int(info.offset))
                data = f.read(int(info.length))
        except OSError as e:
            raise ConfigError(f"{root / rel} cannot be read ({e.strerror})") from None
        load_weights_only(data, f"{root / rel} (object {key!r})")
    if check_common and (root / "common.pt").is_file():
        load_weights_only(root / "common.pt", str(root / "common.pt"))

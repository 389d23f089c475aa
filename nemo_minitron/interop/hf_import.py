"""``import-hf``: a Hugging Face Llama / Mistral / Qwen2 directory -> our checkpoint.

Everything is checked before anything is written: the architecture, every tensor's presence
and shape against ``config.json`` (read from the safetensors headers, no data), every shard of
the index, and the tokenizer's vocabulary against the embedding. Then each rank builds its
``GPTModel`` stage for the requested TP/PP layout, reads only its own tensors, and the model is
saved with ``checkpoint.io.save_checkpoint``: an ordinary checkpoint that loads under any
layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from nemo_minitron.config import ConfigError, ModelConfig, ParallelConfig
from nemo_minitron.data.tokenizer import Tokenizer, load_tokenizer
from nemo_minitron.interop.hf_config import model_config_from_hf
from nemo_minitron.interop.hf_weights import HFTensors, megatron_tensor
from nemo_minitron.utils.logging import get_logger

log = get_logger("interop")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class TensorSource(Protocol):
    """Full tensors by Hugging Face name (a safetensors directory, a GGUF file)."""

    def get(self, name: str) -> torch.Tensor: ...


@dataclass
class HFSource:
    """A checked Hugging Face checkpoint (a directory, or a file converted to HF names)."""

    config: ModelConfig
    """The model it holds, as our config."""
    tensors: TensorSource
    """Lazy access to its tensors, by Hugging Face name."""
    tokenizer: Tokenizer | None
    """Its tokenizer, when the directory has one."""


def inspect_hf(hf_dir: str | os.PathLike[str], seq_length: int | None = None) -> HFSource:
    """Read and check ``hf_dir`` without loading any weight data."""
    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise ConfigError(f"hf_dir={str(hf_dir)!r} has no config.json")
    try:
        hf: dict[str, Any] = json.loads((d / "config.json").read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{d / 'config.json'} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{d / 'config.json'} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{d / 'config.json'} must be a JSON object")
    cfg = model_config_from_hf(hf, seq_length)
    tensors = HFTensors(d)
    tensors.check(cfg)
    tokenizer = None
    if any((d / f).exists() for f in TOKENIZER_FILES):
        tokenizer = load_tokenizer(d)
        assert cfg.vocab_size is not None
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the "
                              f"embedding only {cfg.vocab_size} rows (config.json vocab_size)")
    else:
        log.warning("%s has no tokenizer files; the checkpoint will have none (export-hf "
                    "writes weights and config only; verbs that need one say how to add it)", d)
    return HFSource(config=cfg, tensors=tensors, tokenizer=tokenizer)


def import_hf(hf_dir: str | os.PathLike[str], out: str | os.PathLike[str],
              parallel: ParallelConfig | None = None, seq_length: int | None = None) -> Path:
    """Convert ``hf_dir`` into the checkpoint ``out`` (every rank calls this)."""
    if Path(out).exists():
        raise ConfigError(f"output {str(out)!r} already exists")
    return write_checkpoint(inspect_hf(hf_dir, seq_length), out, parallel, origin=str(hf_dir))


def write_checkpoint(src: HFSource, out: str | os.PathLike[str],
                     parallel: ParallelConfig | None = None, origin: str = "") -> Path:
    """Build the model of a checked source under ``parallel``, fill each rank's stage from its
    HF tensors and save it as an ordinary checkpoint (every rank calls this)."""
    from nemo_minitron.checkpoint.io import save_checkpoint
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.full_state import fill_model
    from nemo_minitron.parallel.runtime import init_distributed

    parallel = parallel or ParallelConfig()
    src.config.check_layout(parallel.tensor_model_parallel_size,
                            parallel.pipeline_model_parallel_size)
    init_distributed(parallel)
    model = build_model(src.config)
    fill_model(model, src.config, lambda name, layer: megatron_tensor(
        name, layer, src.config, src.tensors.get))
    path = save_checkpoint(out, model, model_cfg=src.config, tokenizer=src.tokenizer)
    log.info("imported %s -> %s (%d layers, hidden %d, vocab %d)", origin, out,
             src.config.num_layers, src.config.hidden_size, src.config.vocab_size)
    return path


def parse_import_overrides(overrides: list[str]) -> tuple[ParallelConfig, int | None]:
    """``parallel.*`` and ``model.seq_length`` overrides of the import verbs."""
    from nemo_minitron.config import from_dict, parse_overrides

    data = parse_overrides(overrides)
    model = data.pop("model", None) or {}
    parallel = from_dict(ParallelConfig, data.pop("parallel", None), "parallel.")
    unknown = [f"model.{k}" for k in model if k != "seq_length"] + list(data)
    if unknown:
        raise ConfigError(f"unknown override {unknown[0]!r} (import takes parallel.* and "
                          f"model.seq_length)")
    seq = model.get("seq_length")
    if seq is not None and (not isinstance(seq, int) or seq <= 0):
        raise ConfigError(f"model.seq_length={seq!r} must be a positive integer")
    return parallel, seq

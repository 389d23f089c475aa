"""``import-nemo2``: a NeMo 2 checkpoint directory -> our checkpoint, without importing NeMo.

A NeMo 2 checkpoint is ``context/`` (``model.yaml``: the model and its Megatron
``TransformerConfig`` fields under ``config``, each object tagged with ``_target_``; ``io.json``:
the same as a fiddle graph; ``nemo_tokenizer/``: the tokenizer files) and ``weights/``: a
Megatron distributed checkpoint of the ``GPTModel`` whose keys carry NeMo's ``module.`` prefix
(``module.decoder.layers.self_attention.linear_qkv.weight`` with the layers stacked). Since both
sides are Megatron-core, the weights load straight into our ``GPTModel`` by asking for the same
keys with that prefix; only ``model.yaml`` is parsed (``yaml.safe_load``: tags are strings).

Untrusted input: ``common.pt`` is never loaded; the distributed checkpoint's ``.metadata`` and
byte objects are checked first (``checkpoint.safety``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from nemo_minitron.checkpoint.safety import read_dist_metadata, verify_dist_checkpoint
from nemo_minitron.config import ConfigError, ModelConfig, ParallelConfig
from nemo_minitron.utils.logging import get_logger

log = get_logger("interop")

PREFIX = "module."


def read_metadata(weights: Path) -> dict[str, tuple[int, ...] | None]:
    """Key -> global shape (None for byte objects) of a distributed checkpoint, read with the
    restricted unpickler."""
    meta = read_dist_metadata(weights)
    return {k: tuple(v.size) if hasattr(v, "size") else None
            for k, v in meta.state_dict_metadata.items()}


def _target(node: Any) -> str:
    return node.get("_target_", "") if isinstance(node, dict) else str(node or "")


def model_config_from_nemo(cfg: dict[str, Any], vocab_size: int) -> ModelConfig:
    """Our ``ModelConfig`` from the ``config`` mapping of NeMo's ``model.yaml``."""
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if not isinstance(cfg.get(key), int):
            raise ConfigError(f"context/model.yaml config.{key} is missing or not an integer")
    act = _target(cfg.get("activation_func")) or "torch.nn.functional.gelu"
    gated = bool(cfg.get("gated_linear_unit", False))
    activation = {(True, "silu"): "swiglu", (False, "gelu"): "gelu",
                  (False, "squared_relu"): "squared_relu"}.get((gated, act.rsplit(".", 1)[-1]))
    if activation is None:
        raise ConfigError(f"context/model.yaml activation {act} with gated_linear_unit={gated} "
                          f"is not supported (SwiGLU, GeLU or squared ReLU)")
    if float(cfg.get("rotary_percent", 1.0)) != 1.0:
        raise ConfigError("context/model.yaml config.rotary_percent != 1.0 is not supported")
    rope_factor = None
    if "scale_factor" in cfg:  # NeMo's Llama 3.1 configs
        want = {"low_freq_factor": 1, "high_freq_factor": 4, "old_context_len": 8192}
        if any(float(cfg.get(k, -1)) != v for k, v in want.items()):
            raise ConfigError(f"context/model.yaml RoPE scaling must have {want} (Megatron's "
                              f"built-in Llama 3.1 constants)")
        rope_factor = float(cfg["scale_factor"])
    for key in ("num_moe_experts", "window_size"):
        if cfg.get(key):
            raise ConfigError(f"context/model.yaml config.{key}={cfg[key]} is not supported")
    h = cfg["hidden_size"]
    return ModelConfig(
        num_layers=cfg["num_layers"], hidden_size=h,
        ffn_hidden_size=cfg.get("ffn_hidden_size") or 4 * h,
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg.get("num_query_groups"), kv_channels=cfg.get("kv_channels"),
        vocab_size=vocab_size, make_vocab_size_divisible_by=1,
        seq_length=int(cfg.get("seq_length") or 2048),
        normalization=cfg.get("normalization", "LayerNorm"),
        layernorm_epsilon=float(cfg.get("layernorm_epsilon", 1e-5)),
        activation=activation,
        position_embedding_type=cfg.get("position_embedding_type", "learned_absolute"),
        rotary_base=int(cfg.get("rotary_base", 10000)),
        rope_scaling_factor=rope_factor,
        share_embeddings_and_output_weights=bool(
            cfg.get("share_embeddings_and_output_weights", True)),
        add_bias_linear=bool(cfg.get("add_bias_linear", True)),
        add_qkv_bias=bool(cfg.get("add_qkv_bias", False)),
        init_method_std=float(cfg.get("init_method_std", 0.02)),
    )


def inspect_nemo2(path: str | os.PathLike[str]) -> tuple[ModelConfig, Path, Any]:
    """(config, weights dir, tokenizer or None) of a NeMo 2 checkpoint; nothing loaded."""
    from nemo_minitron.data.tokenizer import load_tokenizer

    root = Path(path)
    model_yaml, weights = root / "context" / "model.yaml", root / "weights"
    if not model_yaml.is_file() or not weights.is_dir():
        raise ConfigError(f"{str(path)!r} is not a NeMo 2 checkpoint (needs context/model.yaml "
                          f"and weights/)")
    try:
        doc = yaml.safe_load(model_yaml.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"{model_yaml} is not valid YAML") from None
    cfg = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{model_yaml} has no config mapping")
    shapes = read_metadata(weights)
    emb = shapes.get(PREFIX + "embedding.word_embeddings.weight")
    if not emb:
        raise ConfigError(f"{weights} holds no {PREFIX}embedding.word_embeddings.weight")
    config = model_config_from_nemo(cfg, vocab_size=emb[0])
    tok_dir = root / "context" / "nemo_tokenizer"
    models = sorted((root / "context").rglob("*.model"))
    tokenizer = None
    if tok_dir.is_dir() and any(tok_dir.glob("*.json")):
        tokenizer = load_tokenizer(tok_dir)
    elif models:
        tokenizer = load_tokenizer(models[0])
    if tokenizer is not None and tokenizer.vocab_size > emb[0]:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the embedding "
                          f"only {emb[0]} rows")
    return config, weights, tokenizer


def _skip_common():
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class SkipCommon(TorchCommonLoadStrategy):
        """Never unpickles ``common.pt`` (NeMo keeps no weight there)."""

        def load_common(self, checkpoint_dir):  # noqa: ANN001, ANN201
            return {}

    return SkipCommon()


def load_nemo2_weights(model: torch.nn.Module, weights: Path) -> None:
    """Load ``weights`` (NeMo's ``module.``-prefixed keys) into this rank's stage."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from nemo_minitron.model.build import unwrap

    inner = unwrap(model)
    request = {k: v for k, v in inner.sharded_state_dict(prefix=PREFIX).items()
               if not isinstance(v, ShardedObject)}
    verify_dist_checkpoint(weights, check_common=False)
    state = dist_checkpointing.load(request, str(weights), common_strategy=_skip_common())
    state = {k[len(PREFIX):]: v for k, v in state.items()}
    missing, _ = inner.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise ConfigError(f"NeMo 2 weights lack {missing[0]}")


def import_nemo2(path: str | os.PathLike[str], out: str | os.PathLike[str],
                 parallel: ParallelConfig | None = None) -> Path:
    """Convert the NeMo 2 checkpoint ``path`` into our checkpoint ``out`` (every rank)."""
    from nemo_minitron.checkpoint.io import save_checkpoint
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    if Path(out).exists():
        raise ConfigError(f"output {str(out)!r} already exists")
    cfg, weights, tokenizer = inspect_nemo2(path)
    parallel = parallel or ParallelConfig()
    cfg.check_layout(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)
    init_distributed(parallel)
    model = build_model(cfg)
    load_nemo2_weights(model, weights)
    saved = save_checkpoint(out, model, model_cfg=cfg, tokenizer=tokenizer)
    log.info("imported NeMo 2 checkpoint %s -> %s", path, out)
    return saved

"""Hugging Face Llama-family tensors <-> Megatron ``GPTModel`` tensors (full, TP=1 layouts).

HF keeps separate ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj``, which are
exactly the parts of Megatron's fused ``linear_qkv`` and SwiGLU ``linear_fc1``
(``model.layouts.split_qkv`` / ``split_fc1``). RoPE needs no
permutation: HF and Megatron (``rotary_interleaved=False``) both rotate the two halves of a head.

Reading goes through ``safetensors.safe_open`` one tensor at a time (never ``torch.load``), so
memory stays near one tensor, and each rank reads only the tensors of its own pipeline stage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.interop.hf_moe import (
    expected_moe_shapes,
    fused_expert_parts,
    fused_expert_shapes,
    hf_moe_views,
    megatron_moe_tensor,
)
from nemo_minitron.model.layouts import (
    fc1_views,
    join_fc1,
    join_qkv,
    qkv_views,
    split_layer_key,
)

# Megatron layer-local name -> HF layer-local name, for one-to-one tensors. The TE spec fuses the
# norms into the following linear (``layer_norm_weight``); both spellings map to the same tensor.
_LAYER_1TO1 = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    # Linear replacements of a heterogeneous layer (DeciLM names), their norms under TE.
    "self_attention.weight": "self_attn.linear_attn.weight",
    "mlp.weight": "mlp.linear_mlp.weight",
    "self_attention.layer_norm_weight": "input_layernorm.weight",
    "mlp.layer_norm_weight": "post_attention_layernorm.weight",
}
_TOP_1TO1 = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
}


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of ``cfg`` holds, with its shape."""
    h, d, v, a = cfg.hidden_size, cfg.head_dim, cfg.vocab_size, cfg.num_attention_heads
    assert v is not None
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h),
                                          "model.norm.weight": (h,)}
    if not cfg.share_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg.num_layers):
        p, one, kind = f"model.layers.{i}.", cfg.layer_config(i), cfg.layer_shape(i)
        g, f = one.query_groups, one.ffn_hidden_size  # this layer's own sizes
        if kind.attention != "no_op":
            shapes[p + "input_layernorm.weight"] = (h,)
        if kind.mlp != "no_op":
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        if kind.attention == "linear":
            shapes[p + "self_attn.linear_attn.weight"] = (h, h)
        if kind.mlp == "linear":
            shapes[p + "mlp.linear_mlp.weight"] = (h, h)
        if kind.attention == "full":
            shapes.update({p + "self_attn.q_proj.weight": (a * d, h),
                           p + "self_attn.k_proj.weight": (g * d, h),
                           p + "self_attn.v_proj.weight": (g * d, h),
                           p + "self_attn.o_proj.weight": (h, a * d)})
        if kind.mlp == "full":
            shapes.update(expected_moe_shapes(cfg, p) if cfg.is_moe else {
                p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f)})
        if cfg.qk_layernorm and kind.attention == "full":
            shapes.update({p + f"self_attn.{x}_norm.weight": (d,) for x in "qk"})
        if cfg.add_qkv_bias and kind.attention == "full":
            shapes.update({p + "self_attn.q_proj.bias": (a * d,),
                           p + "self_attn.k_proj.bias": (g * d,),
                           p + "self_attn.v_proj.bias": (g * d,)})
    return shapes


class HFTensors:
    """The tensors of an HF checkpoint directory (``model.safetensors`` or a sharded
    ``model.safetensors.index.json``), opened lazily, shard by shard."""

    def __init__(self, directory: str | os.PathLike[str]):
        d = Path(directory)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"{index} has no weight_map")
            self.files = {k: d / f for k, f in weight_map.items()}
        elif (d / "model.safetensors").is_file():
            with _open(d / "model.safetensors") as f:
                self.files = {k: d / "model.safetensors" for k in f.keys()}  # noqa: SIM118
        else:
            found = "pytorch_model.bin" if (d / "pytorch_model.bin").exists() else "nothing"
            raise ConfigError(f"{str(d)!r} holds no model.safetensors or "
                              f"model.safetensors.index.json (found {found}; only safetensors "
                              f"are read, never pickles)")
        missing = sorted({str(f) for f in self.files.values() if not f.is_file()})
        if missing:
            raise ConfigError(f"shard {missing[0]} named in the index is missing")
        self.parts: dict[str, tuple[str, tuple[int | slice, ...] | None]] = {}
        """Names read as slices of a stored tensor (fused MoE experts, set by ``check``)."""

    def _stored(self, name: str) -> tuple[str, Path, tuple[int | slice, ...] | None]:
        real, index = self.parts.get(name, (name, None))
        return real, self.files[real], index

    def shape(self, name: str) -> tuple[int, ...]:
        real, path, index = self._stored(name)
        with _open(path) as f:
            shape = tuple(f.get_slice(real).get_shape())
        # the shape of the slice, computed on a tensor without data
        return shape if index is None else tuple(torch.empty(shape, device="meta")[index].shape)

    def dtype(self, name: str) -> str:
        """The safetensors dtype tag (``F32``, ``BF16``, ``BOOL``, ``I32``, ...)."""
        real, path, _ = self._stored(name)
        with _open(path) as f:
            return str(f.get_slice(real).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        real, path, index = self._stored(name)
        with _open(path) as f:
            t = f.get_tensor(real) if index is None else f.get_slice(real)[index]
        if not torch.isfinite(t).all():
            what = "NaN" if torch.isnan(t).any() else "Inf"
            raise ConfigError(f"tensor {name!r} in {path} holds {what} values")
        return t

    def check(self, cfg: ModelConfig) -> None:
        """Every tensor ``cfg`` needs is there with its shape, and nothing else (experts stored
        fused are read as their per-expert slices: ``hf_moe.fused_expert_parts``)."""
        want = expected_hf_shapes(cfg)
        fused: dict[str, tuple[int, ...]] = {}
        if cfg.is_moe:
            self.parts = fused_expert_parts(cfg, self.files)
            fused = fused_expert_shapes(cfg, self.parts)
        # The stored fused tensors first: their slices' shapes follow from theirs.
        for name, shape in {**fused, **want}.items():
            if name not in self.files and name not in self.parts:
                raise ConfigError(f"checkpoint lacks tensor {name!r}")
            have = self.shape(name)
            dtype = self.dtype(name)
            if dtype not in _FLOAT_DTYPES:
                raise ConfigError(f"tensor {name!r} in {self._stored(name)[1]} has dtype "
                                  f"{dtype}; weights must be floating point "
                                  f"({', '.join(_FLOAT_DTYPES)})")
            if have != shape:
                raise ConfigError(f"tensor {name!r} has shape {list(have)}, config.json implies "
                                  f"{list(shape)}")
        extra = [k for k in self.files if k not in want and k not in fused
                 and not k.endswith("rotary_emb.inv_freq")
                 and not (k == "lm_head.weight" and cfg.share_embeddings_and_output_weights)]
        if extra:
            raise ConfigError(f"checkpoint holds tensor {extra[0]!r} that the config does not "
                              f"explain")


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@contextmanager
def _open(path: Path) -> Iterator[Any]:
    """``safe_open(path)``; a truncated or foreign file is a one-line error naming it (the
    header is checked against the file's size on opening, so no later read fails this way)."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(path, "pt")
    except SafetensorError as e:
        raise ConfigError(f"{path} is truncated or not a safetensors file ({e})") from None
    with f:
        yield f


def megatron_tensor(name: str, layer: int | None, cfg: ModelConfig,
                    get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The full (TP=1) Megatron tensor ``name`` (``layer`` is the global layer index of a
    ``decoder.layers.*`` name) from HF tensors read by ``get``."""
    if layer is None:
        if name in _TOP_1TO1:
            return get(_TOP_1TO1[name])
        if name == "output_layer.weight":
            tied = cfg.share_embeddings_and_output_weights
            return get("model.embed_tokens.weight" if tied else "lm_head.weight")
        raise ConfigError(f"no Hugging Face tensor maps to {name!r}")
    p = f"model.layers.{layer}."
    moe = megatron_moe_tensor(name, p, cfg, get) if cfg.is_moe else None
    if moe is not None:
        return moe
    if name in _LAYER_1TO1:
        return get(p + _LAYER_1TO1[name])
    if name in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = name.rsplit(".", 1)[1]
        return join_qkv(*(get(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"),
                        cfg.layer_config(layer))
    if name == "mlp.linear_fc1.weight":
        return join_fc1(get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight"))
    raise ConfigError(f"no Hugging Face tensor maps to {name!r}")


def hf_views(key: str, w: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors that the full Megatron tensor ``key`` (global layer numbers) holds, by HF
    name, as views of ``w`` (no copy; q/k/v blocked as in ``layouts.qkv_views``, so
    ``view.reshape(-1, *w.shape[1:])`` is the HF tensor). Empty for ``_extra_state`` and for
    an output layer tied to the embeddings."""
    if key.endswith("_extra_state"):
        return []
    parsed = split_layer_key(key)
    if parsed is None:
        if key in _TOP_1TO1:
            return [(_TOP_1TO1[key], w)]
        if key == "output_layer.weight":
            return [] if cfg.share_embeddings_and_output_weights else [("lm_head.weight", w)]
        raise ConfigError(f"no Hugging Face tensor maps to {key!r}")
    p, name = f"model.layers.{parsed[0]}.", parsed[1]
    moe = hf_moe_views(name, p, w, cfg) if cfg.is_moe else None
    if moe is not None:
        return moe
    if name in _LAYER_1TO1:
        return [(p + _LAYER_1TO1[name], w)]
    if name in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = name.rsplit(".", 1)[1]
        views = qkv_views(w, cfg.layer_config(parsed[0]))  # the layer's own query groups
        return [(f"{p}self_attn.{x}_proj.{kind}", t) for x, t in zip("qkv", views)]
    if name == "mlp.linear_fc1.weight":
        gate, up = fc1_views(w)
        return [(p + "mlp.gate_proj.weight", gate), (p + "mlp.up_proj.weight", up)]
    raise ConfigError(f"no Hugging Face tensor maps to {key!r}")


def hf_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (TP=1, PP=1) Megatron state dict -> HF tensors (layers numbered 0..L-1)."""
    for key, w in sd.items():
        for name, view in hf_views(key, w, cfg):
            yield name, (view if view.dim() == w.dim()
                         else view.reshape(-1, *w.shape[1:]).contiguous())

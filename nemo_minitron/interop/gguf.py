"""``import-gguf``: a llama.cpp GGUF file -> our checkpoint.

The file is read with the ``gguf`` package (pure Python, memory-mapped): its metadata becomes an
HF-style ``config.json`` dict, its tensors are renamed to Hugging Face names and dequantized one
at a time (every type ``gguf.quants`` can dequantize), and the ordinary Hugging Face import path
(``hf_import.write_checkpoint``) writes the checkpoint. llama.cpp's converter permutes the rows
of the Llama Q and K projections (``convert_hf_to_gguf.py``: per head, the two RoPE halves are
interleaved); that permutation is undone here. Qwen2 files are not permuted.

The tokenizer is rebuilt from the metadata as a Hugging Face ``tokenizers`` byte-level BPE
(``tokenizer.ggml.model == "gpt2"``: vocabulary, merges, the pre-tokenizer llama.cpp names in
``tokenizer.ggml.pre``, control tokens as special tokens, the chat template) and saved with the
checkpoint. A file without tokenizer metadata, or with a tokenizer kind not handled here, imports
its weights with a warning and no tokenizer.

Everything is checked before any output is written: the architecture, every tensor's type,
extent in the file, presence and shape.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_minitron.config import ConfigError, ParallelConfig
from nemo_minitron.interop.hf_config import model_config_from_hf
from nemo_minitron.interop.hf_import import HFSource, write_checkpoint
from nemo_minitron.interop.hf_weights import expected_hf_shapes
from nemo_minitron.utils.logging import get_logger

log = get_logger("interop")

# GGUF ``general.architecture`` -> the Hugging Face class it is imported as.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Architectures whose Q/K rows llama.cpp's converter permutes.
_PERMUTED = ("llama",)

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# llama.cpp ``tokenizer.ggml.pre`` -> the split regex of its pre-tokenizer (None: GPT-2's own,
# which ``ByteLevel(use_regex=True)`` applies). "smollm" first isolates every digit.
_GPT2 = None
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, str | None] = {
    "default": _GPT2, "gpt-2": _GPT2, "smollm": _GPT2, "llama-bpe": _LLAMA3, "llama3": _LLAMA3,
    "qwen2": _QWEN2,
}
_DIGITS_FIRST = ("smollm",)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def dequantizable_types() -> list[str]:
    """Names of the GGML tensor types this import reads (what ``gguf.quants`` dequantizes)."""
    import gguf

    return ["F32", "F16"] + [t.name for t in gguf.GGMLQuantizationType
                             if isinstance(getattr(gguf.quants, t.name, None), type)]


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute``: per head, rows ``[x0, y0, x1, y1, ...]`` (RoPE pairs
    interleaved) back to ``[x0, x1, ..., y0, y1, ...]`` (the two halves HF/Megatron rotate)."""
    rest = w.shape[1:]
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest)
            .transpose(1, 2).reshape(w.shape).contiguous())


class GGUFFile:
    """A checked GGUF file: metadata values and lazily dequantized HF-named tensors."""

    def __init__(self, path: str | os.PathLike[str]):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"gguf file {str(path)!r} does not exist")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises bare ValueError/IndexError on bad bytes
            raise ConfigError(f"{self.path} is not a readable GGUF file "
                              f"({type(e).__name__}: {e})") from None
        self.arch = self.value("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"{self.path}: GGUF architecture {self.arch!r} is not supported; "
                              f"supported: {', '.join(ARCHITECTURES)}")
        ok = set(dequantizable_types())
        self.tensors: dict[str, Any] = {}
        for t in self.reader.tensors:
            if t.tensor_type.name not in ok:
                raise ConfigError(f"{self.path}: tensor {t.name!r} has quantization type "
                                  f"{t.tensor_type.name}, which cannot be dequantized "
                                  f"(supported: {', '.join(sorted(ok))})")
            if t.data.nbytes != int(t.n_bytes) or t.data_offset + t.n_bytes > self.size:
                raise ConfigError(f"{self.path} is truncated: tensor {t.name!r} needs "
                                  f"{int(t.n_bytes)} bytes at offset {t.data_offset}, the file "
                                  f"has {self.size}")
            self.tensors[self._hf_name(t.name)] = t
        self.config = self._hf_config()
        self.n_read = 0

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def value(self, key: str, default: Any = None) -> Any:
        """A metadata value (arrays as lists, strings decoded)."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception:
            raise ConfigError(f"{self.path}: metadata {key!r} cannot be read") from None

    def _hf_name(self, name: str) -> str:
        if name in _TOP:
            return _TOP[name]
        m = _BLOCK_RE.match(name)
        if m is None or m.group(2) not in _BLOCK:
            raise ConfigError(f"{self.path}: tensor {name!r} has no Hugging Face counterpart "
                              f"(not supported)")
        return f"model.layers.{int(m.group(1))}.{_BLOCK[m.group(2)]}.{m.group(3)}"

    def _int(self, key: str, default: int | None = None) -> int:
        v = self.value(f"{self.arch}.{key}", default)
        if isinstance(v, list):
            raise ConfigError(f"{self.path}: {self.arch}.{key} varies per layer ({v[:4]}...); "
                              f"not supported")
        if not isinstance(v, int | np.integer):
            raise ConfigError(f"{self.path}: metadata {self.arch}.{key} is missing or not an "
                              f"integer")
        return int(v)

    def _hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` this file's metadata describes."""
        a = self.arch
        for key in ("rope.scaling.type", "attention.sliding_window", "expert_count"):
            if self.value(f"{a}.{key}") not in (None, "none", 0):
                raise ConfigError(f"{self.path}: {a}.{key}={self.value(f'{a}.{key}')!r} is not "
                                  f"supported")
        hidden, heads = self._int("embedding_length"), self._int("attention.head_count")
        head_dim = self._int("attention.key_length", hidden // heads)
        rot = self._int("rope.dimension_count", head_dim)
        if rot != head_dim:
            raise ConfigError(f"{self.path}: {a}.rope.dimension_count={rot} differs from the head "
                              f"dimension {head_dim} (partial RoPE is not supported)")
        emb = self.tensors.get("model.embed_tokens.weight")
        if emb is None:
            raise ConfigError(f"{self.path}: no token_embd.weight tensor")
        vocab = int(emb.shape[-1])
        return {
            "architectures": [ARCHITECTURES[a]],
            "hidden_size": hidden,
            "intermediate_size": self._int("feed_forward_length"),
            "num_hidden_layers": self._int("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._int("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "vocab_size": vocab,
            "max_position_embeddings": self._int("context_length", 4096),
            "rms_norm_eps": float(self.value(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self.value(f"{a}.rope.freq_base", 10000.0)),
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "hidden_act": "silu",
        }

    def shape(self, name: str) -> tuple[int, ...]:
        """HF-order shape (GGUF lists dimensions innermost first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def get(self, name: str) -> torch.Tensor:
        """The dequantized fp32 tensor ``name`` (HF name, HF layout)."""
        import gguf

        t = self.tensors[name]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                      dtype=np.float32)).reshape(self.shape(name))
        if self.arch in _PERMUTED and ".self_attn.q_proj." in name:
            w = unpermute_qk(w, self.config["num_attention_heads"])
        elif self.arch in _PERMUTED and ".self_attn.k_proj." in name:
            w = unpermute_qk(w, self.config["num_key_value_heads"])
        self.n_read += 1
        if self.n_read % 50 == 0:
            log.info("dequantized %d tensors", self.n_read)
        return w

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every tensor the model needs is there with its shape, and nothing else."""
        for name, shape in expected.items():
            if name not in self.tensors:
                raise ConfigError(f"{self.path} lacks tensor {name!r} (HF name)")
            if self.shape(name) != shape:
                raise ConfigError(f"{self.path}: tensor {name!r} has shape "
                                  f"{list(self.shape(name))}, the metadata implies {list(shape)}")
        extra = [k for k in self.tensors if k not in expected]
        if extra:
            raise ConfigError(f"{self.path} holds tensor {extra[0]!r} that the metadata does not "
                              f"explain")


def _byte_level_vocab(tokens: list[str]) -> dict[str, int]:
    """Token -> id, every token spelled in GPT-2's byte alphabet (llama.cpp keeps the alphabet
    spelling; a token written with other characters is re-spelled from its UTF-8 bytes)."""
    spell = _bytes_to_unicode()
    alphabet = set(spell)
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if not set(tok) <= alphabet:
            tok = "".join(spell[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    return vocab


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, indexed by byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def build_tokenizer(meta: GGUFFile) -> Any | None:
    """A ``transformers.PreTrainedTokenizerFast`` from the file's tokenizer metadata, or None
    (with a warning) when there is none or it is not a kind handled here."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    kind, tokens = meta.value("tokenizer.ggml.model"), meta.value("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        log.warning("%s has no tokenizer metadata; importing the weights without a tokenizer",
                    meta.path)
        return None
    pre = meta.value("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        what = (f"tokenizer.ggml.model={kind!r}" if kind != "gpt2"
                else f"tokenizer.ggml.pre={pre!r}")
        log.warning("%s: %s is not supported (supported: gpt2 with pre %s); importing the "
                    "weights without a tokenizer", meta.path, what, ", ".join(PRE_TOKENIZERS))
        return None
    merges = [tuple(m.split(" ", 1)) for m in meta.value("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(_byte_level_vocab(tokens), merges, fuse_unk=False))
    split = PRE_TOKENIZERS[pre]
    steps: list[Any] = [pre_tokenizers.Digits(individual_digits=True)] if pre in _DIGITS_FIRST \
        else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    types = meta.value("tokenizer.ggml.token_type") or [1] * len(tokens)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED])

    def special(key: str) -> str | None:
        i = meta.value(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos = special("bos")
    if meta.value("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokens.index(bos))])
    kwargs = {name: special(key) for name, key in (("bos_token", "bos"), ("eos_token", "eos"),
                                                   ("unk_token", "unknown"),
                                                   ("pad_token", "padding"))}
    template = meta.value("tokenizer.chat_template")
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template,
                                   **{k: v for k, v in kwargs.items() if v is not None})


@contextmanager
def gguf_source(path: str | os.PathLike[str], seq_length: int | None = None
                ) -> Iterator[HFSource]:
    """The checked file as an ``HFSource`` (its tokenizer saved aside while in use)."""
    from nemo_minitron.data.tokenizer import GENERATION_CONFIG, load_tokenizer

    f = GGUFFile(path)
    cfg = model_config_from_hf(f.config, seq_length)
    f.check(expected_hf_shapes(cfg))
    hf_tok = build_tokenizer(f)
    with tempfile.TemporaryDirectory(prefix="nm-gguf-tok-") as tmp:
        tokenizer = None
        if hf_tok is not None:
            hf_tok.save_pretrained(tmp)
            eos = [f.value(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
            eos = list(dict.fromkeys(i for i in eos if isinstance(i, int)))
            if len(eos) > 1:  # llama.cpp ends generation at every one of them
                (Path(tmp) / GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": eos}))
            tokenizer = load_tokenizer(tmp)
            if tokenizer.vocab_size > f.config["vocab_size"]:
                raise ConfigError(f"{f.path}: the tokenizer has {tokenizer.vocab_size} tokens but "
                                  f"the embedding only {f.config['vocab_size']} rows")
        yield HFSource(config=cfg, tensors=f, tokenizer=tokenizer)


def import_gguf(path: str | os.PathLike[str], out: str | os.PathLike[str],
                parallel: ParallelConfig | None = None, seq_length: int | None = None) -> Path:
    """Convert the GGUF file ``path`` into the checkpoint ``out`` (every rank calls this)."""
    if Path(out).exists():
        raise ConfigError(f"output {str(out)!r} already exists")
    with gguf_source(path, seq_length) as src:
        return write_checkpoint(src, out, parallel, origin=str(path))

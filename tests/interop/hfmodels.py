"""Tiny randomly initialised transformers models and a word-level tokenizer, saved with
``save_pretrained``: the independent reference of the interop tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 160
WORDS = 150  # tokenizer vocabulary; the embedding has VOCAB rows (padding rows are allowed)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)


def save_tokenizer(directory: str | Path, words: int = WORDS) -> None:
    """A whitespace word-level tokenizer ``<unk> <s> </s> w0 w1 ...`` of ``words`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(words - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(directory))


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights of order one logits; norm weights around 1 so a swapped norm is caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1 + noise if name.endswith("norm.weight") else noise)


def save_hf_model(directory: str | Path, arch: str = "llama", seed: int = 0,
                  tokenizer: bool = True, max_shard_size: str = "50GB",
                  original_format: bool = True, **overrides) -> Path:
    """Save a tiny ``arch`` (llama, mistral, qwen2; mixtral, qwen2_moe, qwen3_moe: 4 experts,
    top-2) causal LM and return its directory. ``original_format=False``: MoE experts stored
    fused, as transformers 5 writes them with ``save_original_format=False``."""
    import transformers as tf

    kw = dict(SMALL, vocab_size=VOCAB, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kw.update(overrides)
    if arch in ("mistral", "mixtral"):
        kw.setdefault("sliding_window", None)
    if arch in ("mixtral", "qwen2_moe", "qwen3_moe"):
        kw.setdefault("num_experts_per_tok", 2)
        kw.setdefault("num_local_experts" if arch == "mixtral" else "num_experts", 4)
    if arch in ("qwen2_moe", "qwen3_moe"):
        kw.setdefault("moe_intermediate_size", 48)
    if arch == "qwen2_moe":
        kw.setdefault("shared_expert_intermediate_size", 80)
    cls_cfg, cls_model = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                          "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                          "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                          "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
                          "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
                          "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM)}[arch]
    model = cls_model(cls_cfg(**kw))
    randomize(model, seed)
    model.save_pretrained(str(directory), max_shard_size=max_shard_size,
                          save_original_format=original_format)
    if tokenizer:
        save_tokenizer(directory)
    return Path(directory)


def hf_logits(directory: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits of ``from_pretrained(directory)`` with eager attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def tokens(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, WORDS, (batch, seq), generator=torch.Generator().manual_seed(seed))

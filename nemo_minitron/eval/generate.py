"""Batched greedy / sampling generation with a KV cache (Megatron's ``StaticInferenceContext``).

Megatron-core's own static-batching KV cache runs on CPU with our backend: the prompt is
encoded once (prefill), then every step feeds one token per sequence and attends to the cached
keys and values. Prompts of different lengths are batched as Megatron does: prefill up to the
shortest prompt, then step one position at a time, where a row still inside its prompt takes
its prompt token instead of the sampled one. ``use_cache=False`` recomputes the whole prefix
every step (the reference the KV-cache path is tested against). TP is supported (the vocabulary
shards are gathered); PP=1 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nemo_minitron.config import ConfigError
from nemo_minitron.utils.logging import get_logger, warn_once

log = get_logger("eval.generate")


@dataclass(kw_only=True)
class SamplingConfig:
    """How the next token is chosen."""

    max_new_tokens: int = 32
    """Tokens generated after each prompt."""
    greedy: bool = True
    """Argmax decoding; False samples with temperature / top_k / top_p."""
    temperature: float = 1.0
    """Softmax temperature of sampling."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability reaches p (1.0: all)."""
    seed: int = 0
    """Seed of the sampling generator."""
    stop_tokens: list[int] | None = None
    """A row stops at the first of these tokens it emits, which is not part of its result
    (typically the tokenizer's end-of-sequence tokens, ``Tokenizer.eos_ids``)."""

    def __post_init__(self) -> None:
        # Field names (the CLIs' --max-new-tokens, --top-k, ... are the same words).
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0: all tokens)")
        if not 0.0 < self.top_p <= 1.0:  # also rejects NaN
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if not self.temperature > 0.0 or self.temperature == float("inf"):
            raise ConfigError(f"temperature={self.temperature} must be a positive number "
                              "(argmax decoding is greedy, not temperature 0)")


def filter_logits(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """``logits`` scaled by the temperature, outside ``top_k`` / ``top_p`` set to -inf: the
    softmax of the result is the distribution sampling draws from."""
    logits = logits / max(s.temperature, 1e-6)
    if s.top_k > 0:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= s.top_p  # keep the token that crosses p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def _next_token(logits: torch.Tensor, s: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    if s.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, s).softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], sampling: SamplingConfig,
             use_cache: bool = True, vocab_limit: int | None = None) -> list[list[int]]:
    """Generated continuations (without the prompts) of every prompt, in order.
    ``vocab_limit`` keeps sampling inside the tokenizer's vocabulary (padding rows excluded)."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.eval.decode import KVCache, decode_steps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ConfigError("generation runs with pipeline_model_parallel_size=1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    total = int(lengths.max()) + sampling.max_new_tokens
    tokens = torch.zeros(len(prompts), total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p, device=device)
    gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    cache = KVCache(model, len(prompts), total, enabled=use_cache)
    stops = (torch.tensor(sampling.stop_tokens, device=device) if sampling.stop_tokens
             else None)
    for pos, logits in decode_steps(cache, tokens, int(lengths.min()), total):
        logits = logits.float()
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        nxt = _next_token(logits.cpu(), sampling, gen).to(device)
        in_prompt = pos < lengths
        tokens[:, pos] = torch.where(in_prompt, tokens[:, pos], nxt)
        if stops is not None:
            done |= ~in_prompt & torch.isin(nxt, stops)
            if bool(done.all()):
                tokens = tokens[:, :pos + 1]
                break
    model.train(was_training)
    out = []
    stop_set = set(sampling.stop_tokens or ())
    for i, n in enumerate(lengths.tolist()):
        row = tokens[i, n:n + sampling.max_new_tokens].tolist()
        end = next((j for j, t in enumerate(row) if t in stop_set), len(row))
        out.append(row[:end])
    return out


def generate_text(checkpoint: str, prompts: list[str], sampling: SamplingConfig,
                  chat: bool = False) -> list[str]:
    """Load ``checkpoint`` (one process) and continue each text prompt; stops at any of the
    tokenizer's end-of-sequence tokens (not returned). ``chat``: each prompt is a user turn
    rendered with the tokenizer's chat template (sandboxed; a plain default without one)."""
    import dataclasses

    from nemo_minitron.checkpoint.io import load_checkpoint_tokenizer, load_model
    from nemo_minitron.config import ParallelConfig

    tok = load_checkpoint_tokenizer(checkpoint)  # before the runtime: no tokenizer, one line
    model, cfg, _ = load_model(checkpoint, ParallelConfig())
    if sampling.stop_tokens is None:
        sampling = dataclasses.replace(sampling, stop_tokens=tok.eos_ids)
    if chat:
        prompts = chat_prompts(tok, prompts)
    encoded = [tok.encode(p) for p in prompts]
    longest = max((len(e) for e in encoded), default=0)
    if longest + sampling.max_new_tokens > cfg.context_length:
        warn_once(log, f"the longest prompt ({longest} tokens) + --max-new-tokens="
                  f"{sampling.max_new_tokens} is past the model's context length "
                  f"{cfg.context_length}: tokens beyond it come from positions never trained")
    ids = generate(model, encoded, sampling, vocab_limit=tok.vocab_size)
    return [tok.decode(row) for row in ids]


def chat_prompts(tokenizer: Any, prompts: list[str]) -> list[str]:
    """Each text prompt as one user turn followed by the generation prompt, in the tokenizer's
    chat template (``generate --chat``, ``specdec --chat``). Without a template the plain
    default format is used, and the user is told so once: a chat model fed that format answers
    worse than with its own."""
    from nemo_minitron.data.instruct import chat_template_of, render_prompt

    if chat_template_of(tokenizer) is None:
        log.warning("--chat: the checkpoint's tokenizer has no chat template; the prompts use "
                    "the plain default format ('### User:' ... '### Assistant:')")
    return [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]

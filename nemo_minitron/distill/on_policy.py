"""On-policy distillation (generalized knowledge distillation, Agarwal et al. 2024).

A share ``kd.on_policy.fraction`` of the training micro-batches (GKD's lambda) replaces each
example's dataset response by one the student samples from its prompt (batched KV-cache
generation, ``eval.generate``); the teacher then scores prompt + sample in its ordinary
forward and the loss covers the sampled tokens only. The divergence is ``kd.divergence``
(the generalized JSD ``gjsd`` with ``kd.beta`` is GKD's). Validation always uses the dataset
responses.

Which micro-batches are sampled, and the samples, are drawn from a seed derived from
``sampling.seed`` and the micro-batch's first position in the run (``distill.instruct
.Positioned``: one step, data-parallel rank and micro-batch), so the micro-batches of an
interrupted step are regenerated identically on resume, and every tensor-parallel rank of a
micro-batch draws the same tokens (the generator gathers the full vocabulary's logits).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from nemo_minitron.config import ConfigError
from nemo_minitron.eval.generate import SamplingConfig, generate
from nemo_minitron.utils.logging import get_logger, warn_once

log = get_logger("distill.on_policy")


def _sampling() -> SamplingConfig:
    return SamplingConfig(greedy=False)  # GKD samples from the student (temperature 1)


@dataclass(kw_only=True)
class OnPolicyConfig:
    """On-policy distillation on instruction data (``instruct.data``)."""

    fraction: float = 0.0
    """Share of training micro-batches whose responses the student generates (GKD's lambda),
    in [0, 1]; the rest use the dataset responses. 0: off."""
    sampling: SamplingConfig = field(default_factory=_sampling)
    """How the student generates (``eval.generate.SamplingConfig``; default: sampling, not
    greedy). ``seed`` is the base of every micro-batch's seed; ``stop_tokens`` null: the
    tokenizer's end-of-sequence tokens."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:  # also rejects NaN
            raise ConfigError(f"kd.on_policy.fraction={self.fraction} must be in [0, 1]")

    def check(self, *, instruct: bool, pack: bool, pp: int, teacher_cache: bool) -> None:
        """One-line errors for a layout or data on-policy distillation cannot use."""
        if not instruct:
            raise ConfigError("kd.on_policy.fraction > 0 needs instruction data (prompts to "
                              "answer): set instruct.data")
        if pack:
            raise ConfigError("kd.on_policy.fraction > 0 needs instruct.pack=false (one "
                              "example per window)")
        if pp > 1:
            raise ConfigError("kd.on_policy.fraction > 0 needs pipeline_model_parallel_size=1 "
                              "(generation runs on one pipeline stage)")
        if teacher_cache:
            raise ConfigError("kd.on_policy.fraction > 0 needs the live teacher, not "
                              "kd.teacher_cache")

    def check_room(self, seq_length: int) -> None:
        """Every prompt has at least one token and the window is ``seq_length + 1`` tokens."""
        if self.sampling.max_new_tokens >= seq_length:
            raise ConfigError(f"kd.on_policy.sampling.max_new_tokens="
                              f"{self.sampling.max_new_tokens} leaves no room for the prompt in "
                              f"a window of train.seq_length={seq_length} tokens")
        if self.sampling.max_new_tokens == 0:
            raise ConfigError("kd.on_policy.sampling.max_new_tokens=0 samples nothing to "
                              "distill on")


def micro_batch_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the micro-batch that starts at ``position`` in the run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + position) % (1 << 63))


class OnPolicySampler:
    """Turns a padded instruction micro-batch into one of the student's samples (or leaves it,
    with probability ``1 - fraction``)."""

    def __init__(self, cfg: OnPolicyConfig, *, eod: int, stop_tokens: list[int],
                 vocab_limit: int | None):
        self.cfg, self.eod, self.vocab_limit = cfg, eod, vocab_limit
        self.sampling = cfg.sampling if cfg.sampling.stop_tokens is not None else \
            dataclasses.replace(cfg.sampling, stop_tokens=stop_tokens)

    def __call__(self, batch: dict[str, torch.Tensor],
                 student: torch.nn.Module) -> dict[str, torch.Tensor]:
        g = micro_batch_generator(self.sampling.seed, int(batch["sample_index"][0]))
        if float(torch.rand((), generator=g)) >= self.cfg.fraction:
            return batch
        seed = int(torch.randint(0, 1 << 62, (), generator=g))
        return self.resample(batch, student, seed)

    def resample(self, batch: dict[str, torch.Tensor], student: torch.nn.Module,
                 seed: int) -> dict[str, torch.Tensor]:
        """``batch`` with each row's response replaced by the student's sample (seeded by
        ``seed``); ``loss_mask`` covers the sampled tokens (and the stop token) only."""
        tokens, mask = batch["tokens"], batch["loss_mask"]
        b, s = tokens.shape
        # A padded window is prompt + response: the first label with loss is the response's
        # first token, so the prompt is the tokens before it.
        starts = (mask > 0).float().argmax(-1) + 1
        if bool((mask.sum(-1) == 0).any()):
            raise ConfigError("on-policy distillation got a window without response tokens")
        prompts = [tokens[i, :int(starts[i])].tolist() for i in range(b)]
        room = s + 1 - max(len(p) for p in prompts)
        new = min(self.sampling.max_new_tokens, room)
        if new < self.sampling.max_new_tokens:
            warn_once(log, f"on-policy samples are cut to {new} tokens where a prompt of "
                      f"{s + 1 - room} tokens leaves no room for max_new_tokens="
                      f"{self.sampling.max_new_tokens} in the {s + 1}-token window")
        sampling = dataclasses.replace(self.sampling, seed=seed, max_new_tokens=new)
        samples = generate(student, prompts, sampling, vocab_limit=self.vocab_limit)
        ids = torch.full((b, s + 1), self.eod, dtype=tokens.dtype)
        loss = torch.zeros(b, s, dtype=mask.dtype)
        for i, (p, row) in enumerate(zip(prompts, samples)):
            if len(row) < new:  # it stopped: the stop token is part of what it learns
                row = row + [self.eod]
            seq = p + row
            ids[i, :len(seq)] = torch.tensor(seq, dtype=tokens.dtype)
            loss[i, len(p) - 1:len(seq) - 1] = 1
        out = dict(batch)
        out.update(tokens=ids[:, :-1].to(tokens.device), labels=ids[:, 1:].to(tokens.device),
                   loss_mask=loss.to(mask.device),
                   position_ids=torch.arange(s, device=tokens.device).expand(b, s))
        return out

"""Instruction data for supervised fine-tuning: JSONL reading/writing, chat templates,
response-only loss masks, packing or padding into ``seq_length`` windows, and a deterministic
train/validation split.

Formats (one JSON object per line):
  Alpaca: ``{"instruction": str, "input": str (optional), "output": str}``
  chat:   ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
          the last message must be the assistant's: it is the response.

Chat template: the tokenizer's own (``chat_template`` of a Hugging Face
``tokenizer_config.json``) when it has one, rendered in a sandboxed jinja2 environment (the
template comes from an untrusted file); otherwise ``DEFAULT_TEMPLATE``::

    ### System:\\n{content}\\n\\n          (only when a system turn is present)
    ### User:\\n{content}\\n\\n
    ### Assistant:\\n{content}\\n\\n      (earlier assistant turns of a conversation)
    ### Assistant:\\n                     (the generation prompt; the response follows)

Tokens of one example: ``encode(prompt) + encode(response) + [eod]`` (``eod`` is not appended
when the template's response text already holds it, e.g. ``<|im_end|>``). Only the response
tokens and the ``eod`` carry loss.

Windows: every sample is ``seq_length + 1`` tokens (inputs ``[:-1]``, labels ``[1:]``), the
shape Megatron's pipeline schedule exchanges. Padding (default): one example per window, padded
with ``eod`` at zero loss; the causal mask alone isolates the example because the padding comes
after it. Packing: consecutive examples share a window; each restarts its position ids and a
``segment_ids`` row lets the objective build a block-diagonal causal attention mask, so no token
attends across examples. Megatron's local (non-Transformer-Engine) attention honours that
mask; Transformer Engine's causal attention ignores an arbitrary mask, so packing is refused on
that path (``sft_attention_mask``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import torch

from nemo_minitron.config import ConfigError
from nemo_minitron.data.tokenizer import Tokenizer
from nemo_minitron.utils.fs import atomic_write_text

ROLES = ("system", "user", "assistant")

DEFAULT_TEMPLATE = "default"
"""Name of the plain built-in template (see the module docstring)."""


@dataclass
class Example:
    """One instruction example; the last assistant turn of ``messages`` is the response."""

    messages: list[dict[str, str]]
    """Turns as ``{"role", "content"}``; the last one is the assistant's response."""
    fmt: str
    """``"alpaca"`` or ``"chat"``: the format of ``source``."""
    source: dict[str, Any]
    """The original JSON object (written back by ``write_jsonl``)."""
    line: int
    """1-based line number in the file it was read from (0 when built in memory)."""

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """All turns before the response."""
        return self.messages[:-1]

    @property
    def response(self) -> str:
        """The response text (the last assistant turn)."""
        return self.messages[-1]["content"]

    def with_response(self, text: str) -> Example:
        """A copy whose response is ``text``; ``source`` is updated in its own format."""
        messages = [dict(m) for m in self.messages]
        messages[-1]["content"] = text
        source = json.loads(json.dumps(self.source))  # deep copy of plain JSON
        if self.fmt == "alpaca":
            source["output"] = text
        else:
            source["messages"][-1]["content"] = text
        return dataclasses.replace(self, messages=messages, source=source)


# ---------------------------------------------------------------------------------------------
# JSONL


def alpaca_messages(obj: dict[str, Any]) -> list[dict[str, str]]:
    """Alpaca fields -> turns: the instruction (and input, after a blank line) as the user's."""
    user = obj["instruction"]
    if obj.get("input"):
        user = f"{user}\n\n{obj['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]


def parse_example(obj: Any, where: str, line: int = 0) -> Example:
    """One JSON object -> ``Example``; ``ConfigError`` naming ``where`` on a bad object."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ConfigError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise ConfigError(f"{where}: messages[{i}] must be an object with string "
                                  "'role' and 'content'")
            if m["role"] not in ROLES:
                raise ConfigError(f"{where}: messages[{i}] has unknown role {m['role']!r} "
                                  f"(known: {', '.join(ROLES)})")
        if msgs[-1]["role"] != "assistant":
            raise ConfigError(f"{where}: the last message must be the assistant's response, "
                              f"got role {msgs[-1]['role']!r}")
        if len(msgs) < 2:
            raise ConfigError(f"{where}: 'messages' needs a prompt turn before the response")
        messages = [{"role": m["role"], "content": m["content"]} for m in msgs]
        return Example(messages=messages, fmt="chat", source=obj, line=line)
    if "instruction" in obj or "output" in obj:
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str):
                raise ConfigError(f"{where}: Alpaca field {key!r} must be a string")
        if not obj["instruction"].strip():
            raise ConfigError(f"{where}: Alpaca field 'instruction' is empty")
        if "input" in obj and obj["input"] is not None and not isinstance(obj["input"], str):
            raise ConfigError(f"{where}: Alpaca field 'input' must be a string")
        return Example(messages=alpaca_messages(obj), fmt="alpaca", source=obj, line=line)
    raise ConfigError(f"{where}: needs 'instruction' and 'output' (Alpaca) or 'messages' "
                      "(chat)")


def read_jsonl(path: str | os.PathLike[str]) -> list[Example]:
    """Read Alpaca or chat JSONL (blank lines skipped); one-line errors name file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{str(path)!r} does not exist")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not valid UTF-8") from None
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{n}: not JSON ({e.msg})") from None
        out.append(parse_example(obj, f"{p}:{n}", n))
    if not out:
        raise ConfigError(f"{p}: the data set is empty")
    return out


def write_jsonl(path: str | os.PathLike[str], examples: Sequence[Example]) -> None:
    """Write the examples' ``source`` objects, in order, atomically (temp file then rename)."""
    atomic_write_text(path, "".join(json.dumps(e.source, ensure_ascii=False) + "\n"
                                    for e in examples))


# ---------------------------------------------------------------------------------------------
# Chat templates


def chat_template_of(tokenizer: Tokenizer) -> str | None:
    """The tokenizer's own chat template, None when it has none."""
    return getattr(tokenizer, "chat_template", None)


def _raise(message: str) -> None:
    raise ConfigError(f"chat template: {message}")


def _render_jinja(template: str, messages: list[dict[str, str]], tokenizer: Tokenizer | None,
                  add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                              indent=indent)
    env.globals["raise_exception"] = _raise
    special = getattr(tokenizer, "special_tokens", {}) if tokenizer is not None else {}
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special)
    except ConfigError:
        raise
    except TemplateError as e:
        raise ConfigError(f"chat template: {e}") from None


def _render_default(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    parts = [f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages]
    if add_generation_prompt:
        parts.append("### Assistant:\n")
    return "".join(parts)


def render_prompt(tokenizer: Tokenizer | None, messages: list[dict[str, str]],
                  template: str | None = None) -> str:
    """The prompt text of ``messages`` with the generation prompt: ``template`` (a jinja2
    chat template, or ``DEFAULT_TEMPLATE``), else the tokenizer's own, else the default."""
    template = template or (chat_template_of(tokenizer) if tokenizer is not None else None)
    if template is None or template == DEFAULT_TEMPLATE:
        return _render_default(messages, True)
    return _render_jinja(template, messages, tokenizer, True)


def render_example(tokenizer: Tokenizer | None, example: Example,
                   template: str | None = None) -> tuple[str, str]:
    """``(prompt_text, response_text)``. With a jinja template the response text is what the
    template renders after the prompt (its end-of-turn marker included) when the full
    conversation starts with the prompt; otherwise (and for the default) the response itself.
    """
    template = template or (chat_template_of(tokenizer) if tokenizer is not None else None)
    prompt = render_prompt(tokenizer, example.prompt_messages, template)
    if template is None or template == DEFAULT_TEMPLATE:
        return prompt, example.response
    full = _render_jinja(template, example.messages, tokenizer, False)
    if full.startswith(prompt) and len(full) > len(prompt):
        return prompt, full[len(prompt):]
    return prompt, example.response


# ---------------------------------------------------------------------------------------------
# Tokens and masks


@dataclass
class Tokenized:
    """One example as token ids with its loss mask (1 on response tokens and the eod)."""

    ids: list[int]
    loss: list[int]


def tokenize_example(tokenizer: Tokenizer, example: Example,
                     template: str | None = None) -> Tokenized:
    """``encode(prompt) + encode(response) [+ eod]``; loss on the response part only."""
    prompt, response = render_example(tokenizer, example, template)
    p_ids = tokenizer.encode(prompt)
    r_ids = tokenizer.encode(response)
    if tokenizer.eod not in r_ids:
        r_ids = r_ids + [tokenizer.eod]
    if not p_ids:
        raise ConfigError(f"example at line {example.line}: the prompt renders to no tokens")
    return Tokenized(ids=p_ids + r_ids, loss=[0] * len(p_ids) + [1] * len(r_ids))


@dataclass
class Windows:
    """Packed or padded training windows: ``[n, seq_length + 1]`` arrays."""

    ids: numpy.ndarray
    """Token ids (padding is ``eod``)."""
    loss: numpy.ndarray
    """1 where the token is a response token (it is predicted with loss)."""
    segment: numpy.ndarray
    """Example index within the window (0, 1, ...), -1 on padding."""
    examples: list[list[int]]
    """Per window, the indices (into the tokenized list) of its examples."""
    skipped: int
    """Examples longer than ``seq_length + 1`` tokens, left out."""


def build_windows(tokenized: Sequence[Tokenized], seq_length: int, pad_id: int, *,
                  pack: bool, name: str = "data") -> Windows:
    """Pad (one example per window) or pack (consecutive examples, in order, while they fit).
    Examples longer than a window are skipped (counted); all of them too long is an error."""
    width = seq_length + 1
    fits = [i for i, t in enumerate(tokenized) if len(t.ids) <= width]
    skipped = len(tokenized) - len(fits)
    if not fits:
        longest = min(len(t.ids) for t in tokenized) if tokenized else 0
        raise ConfigError(f"{name}: every example is longer than model.seq_length + 1 = "
                          f"{width} tokens (the shortest has {longest})")
    groups: list[list[int]] = []
    used = width
    for i in fits:
        n = len(tokenized[i].ids)
        if pack and used + n <= width:
            groups[-1].append(i)
            used += n
        else:
            groups.append([i])
            used = n
    ids = numpy.full((len(groups), width), pad_id, dtype=numpy.int64)
    loss = numpy.zeros((len(groups), width), dtype=numpy.int64)
    segment = numpy.full((len(groups), width), -1, dtype=numpy.int64)
    for w, group in enumerate(groups):
        pos = 0
        for s, i in enumerate(group):
            t = tokenized[i]
            ids[w, pos:pos + len(t.ids)] = t.ids
            loss[w, pos:pos + len(t.ids)] = t.loss
            segment[w, pos:pos + len(t.ids)] = s
            pos += len(t.ids)
    return Windows(ids=ids, loss=loss, segment=segment, examples=groups, skipped=skipped)


class SFTDataset(torch.utils.data.Dataset):
    """Windows as the loop's samples: ``tokens``, ``labels``, ``loss_mask``,
    ``position_ids`` (restarting at every example) and, when packed, ``segment_ids``."""

    def __init__(self, windows: Windows, *, packed: bool):
        self.windows = windows
        self.packed = packed

    def __len__(self) -> int:
        return len(self.windows.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.windows.ids[i])
        seg = torch.from_numpy(self.windows.segment[i])
        # Label j is token j+1; it carries loss when it is a response token of the same
        # example as token j (the first token of an example is always a prompt token).
        loss = torch.from_numpy(self.windows.loss[i][1:]) * (seg[1:] == seg[:-1])
        sample = {"tokens": ids[:-1].clone(), "labels": ids[1:].clone(),
                  "loss_mask": loss.float(), "position_ids": position_ids(seg[:-1])}
        if self.packed:
            sample["segment_ids"] = seg[:-1].clone()
        return sample


def position_ids(segment: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every change of segment (padding restarts too)."""
    n = segment.numel()
    idx = torch.arange(n)
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = segment[1:] != segment[:-1]
    start_idx = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
    return idx - start_idx


def sft_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Megatron's boolean attention mask ``[b, 1, s, s]`` (True = masked): causal and
    block-diagonal over ``segment_ids [b, s]``."""
    s = segment_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ~(same & causal).unsqueeze(1)


def build_sft_dataset(examples: Sequence[Example], tokenizer: Tokenizer, seq_length: int, *,
                      pack: bool, template: str | None = None,
                      name: str = "data") -> SFTDataset:
    """Tokenize, mask and pad/pack ``examples`` (in the given order)."""
    tokenized = [tokenize_example(tokenizer, e, template) for e in examples]
    windows = build_windows(tokenized, seq_length, tokenizer.eod, pack=pack, name=name)
    return SFTDataset(windows, packed=pack)


# ---------------------------------------------------------------------------------------------
# Split


def split_examples(examples: Sequence[Example], valid_fraction: float, seed: int, *,
                   group: Callable[[Example], str] | None = None
                   ) -> tuple[list[Example], list[Example]]:
    """Deterministic ``(train, valid)``: whole groups (default: single examples) in a seeded
    random order go to validation until it holds ``valid_fraction`` of the examples; both keep
    their input order. ``valid_fraction=0`` leaves validation empty."""
    if not 0 <= valid_fraction < 1:
        raise ConfigError(f"valid_fraction={valid_fraction} must be in [0, 1)")
    keys = [group(e) if group is not None else str(i) for i, e in enumerate(examples)]
    order = sorted(set(keys))
    perm = numpy.random.RandomState(seed).permutation(len(order))
    target = int(round(valid_fraction * len(examples)))
    sizes: dict[str, int] = {}
    for k in keys:
        sizes[k] = sizes.get(k, 0) + 1
    held: set[str] = set()
    count = 0
    for j in perm:
        if count >= target:
            break
        held.add(order[j])
        count += sizes[order[j]]
    train = [e for e, k in zip(examples, keys) if k not in held]
    valid = [e for e, k in zip(examples, keys) if k in held]
    if not train:
        raise ConfigError(f"valid_fraction={valid_fraction} leaves no training examples "
                          f"(of {len(examples)})")
    return train, valid


def shuffle_examples(examples: Sequence[Example], seed: int) -> list[Example]:
    """A seeded permutation (the training order; epochs replay it)."""
    perm = numpy.random.RandomState(seed).permutation(len(examples))
    return [examples[i] for i in perm]

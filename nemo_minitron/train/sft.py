"""The ``sft`` stage: supervised fine-tuning of a checkpoint on instruction data, loss on the
response tokens only, through the one training loop (``SFTObjective``), on any TP/PP/DP layout,
resuming exactly from the latest checkpoint under ``--out``.

Loss: each micro-batch's mean over its response tokens (and end-of-turn tokens), averaged over
the micro-batches of a step, as the pretraining loss is. Training order: the training examples
in a seeded permutation (``data.seed``), padded or packed into windows (``sft.pack``); later
epochs replay the same order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from nemo_minitron.config import ConfigError, Recipe, TrainConfig
from nemo_minitron.data.datasets import GPTSplits
from nemo_minitron.data.instruct import (
    DEFAULT_TEMPLATE,
    Example,
    build_sft_dataset,
    read_jsonl,
    shuffle_examples,
    split_examples,
)
from nemo_minitron.data.tokenizer import Tokenizer
from nemo_minitron.utils.logging import get_logger

log = get_logger("sft")


@dataclass(kw_only=True)
class SFTConfig:
    """Instruction data and how it becomes training windows."""

    SECTION: ClassVar[str] = "sft"  # the recipe key errors name (distill reuses these fields)

    valid_data: str | None = None
    """Held-out JSONL for the validation loss; None splits ``valid_fraction`` off the data."""
    valid_fraction: float = 0.05
    """Share of the examples held out when ``valid_data`` is not given (seeded by
    ``data.seed``)."""
    pack: bool = False
    """Pack several examples into one ``seq_length`` window (per-example positions and a
    block-diagonal attention mask; Megatron's local attention only, not Transformer Engine);
    false pads one example per window."""
    chat_template: str | None = None
    """A jinja2 chat-template file, or ``default`` for the built-in plain template; None uses
    the checkpoint tokenizer's own template when it has one, else the default."""

    def __post_init__(self) -> None:
        if not 0 <= self.valid_fraction < 1:
            raise ConfigError(f"{self.SECTION}.valid_fraction={self.valid_fraction} must be in "
                              "[0, 1)")


def _sft_train() -> TrainConfig:
    # Fine-tuning scale (see recipes/sft.yaml): 1e-5 -> 1e-6 cosine, short warm-up, no decay.
    return TrainConfig(lr=1e-5, min_lr=1e-6, lr_warmup_iters=10, weight_decay=0.0)


@dataclass(kw_only=True)
class SFTRecipe(Recipe):
    """A training recipe plus the instruction data; ``model`` comes from the checkpoint."""

    train: TrainConfig = field(default_factory=_sft_train)
    """Training loop (defaults: lr 1e-5 -> 1e-6, 10 warm-up steps, weight decay 0)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Instruction data."""


def chat_template(cfg: SFTConfig) -> str | None:
    """The template text (from the file ``sft.chat_template``), ``DEFAULT_TEMPLATE`` or None."""
    if cfg.chat_template is None or cfg.chat_template == DEFAULT_TEMPLATE:
        return cfg.chat_template
    p = Path(cfg.chat_template)
    if not p.is_file():
        raise ConfigError(f"{cfg.SECTION}.chat_template={cfg.chat_template!r} does not exist "
                          f"(give a jinja2 file or '{DEFAULT_TEMPLATE}')")
    return p.read_text(encoding="utf-8", errors="replace")


def check_packing(cfg: SFTConfig) -> None:
    """Packing needs per-example attention masks, which Transformer Engine ignores."""
    from nemo_minitron.model.build import te_available

    if cfg.pack and te_available():
        raise ConfigError(f"{cfg.SECTION}.pack=true needs per-example attention masks, which "
                          "Transformer Engine's causal attention ignores; use "
                          f"{cfg.SECTION}.pack=false on GPUs")


def check_responses(examples: Sequence[Example], name: str) -> None:
    """One-line error when every response of the set ``name`` is empty (only the
    end-of-sequence token would carry loss); a warning with the count when some are."""
    empty = sum(not e.response.strip() for e in examples)
    if empty == len(examples):
        raise ConfigError(f"{name}: every response is empty ({empty} examples): there is "
                          "nothing to fine-tune on but the end-of-sequence token")
    if empty:
        log.warning("%s: %d of %d examples have an empty response (they teach the "
                    "end-of-sequence token alone)", name, empty, len(examples))


def sft_splits(recipe: SFTRecipe, data: str, tokenizer: Tokenizer,
               seq_length: int) -> GPTSplits:
    """Training and validation windows of the instruction data."""
    return instruct_splits(recipe.sft, data, tokenizer, seq_length, seed=recipe.data.seed,
                           validate=bool(recipe.train.eval_interval))


def instruct_splits(cfg: SFTConfig, data: str, tokenizer: Tokenizer, seq_length: int, *,
                    seed: int, validate: bool) -> GPTSplits:
    """Training and validation windows of the instruction JSONL ``data`` as ``cfg`` says
    (``sft`` and ``distill`` on instruction data alike); ``validate``: the run validates."""
    examples = read_jsonl(data)
    check_responses(examples, data)
    if cfg.valid_data is not None:
        train, valid = examples, read_jsonl(cfg.valid_data)
        check_responses(valid, cfg.valid_data)
    else:
        train, valid = split_examples(examples, cfg.valid_fraction, seed)
    if not valid and validate:
        raise ConfigError(f"no validation examples: set {cfg.SECTION}.valid_data or "
                          f"{cfg.SECTION}.valid_fraction, or train.eval_interval=0")
    template = chat_template(cfg)
    train_ds = build_sft_dataset(shuffle_examples(train, seed), tokenizer,
                                 seq_length, pack=cfg.pack, template=template, name=data)
    valid_ds = build_sft_dataset(valid, tokenizer, seq_length, pack=cfg.pack, template=template,
                                 name=cfg.valid_data or data) if valid else None
    for name, n, ds in (("training", len(train), train_ds), ("validation", len(valid), valid_ds)):
        if ds is None:
            continue
        if ds.windows.skipped:
            log.warning("%d of %d %s examples are longer than model.seq_length + 1 = %d tokens "
                        "and are skipped", ds.windows.skipped, n, name, seq_length + 1)
        log.info("%s: %d examples in %d windows of %d tokens (%s)", name,
                 n - ds.windows.skipped, len(ds), seq_length, "packed" if cfg.pack else "padded")
    return GPTSplits(train=train_ds, valid=valid_ds, test=None)


def sft(recipe: SFTRecipe, checkpoint: str, data: str, out_dir: str | Path) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` on the instruction JSONL ``data``; the summary names the last
    checkpoint as ``final``."""
    from nemo_minitron.checkpoint.io import load_checkpoint_tokenizer, load_model_config
    from nemo_minitron.parallel.runtime import init_distributed
    from nemo_minitron.train.objectives import SFTObjective
    from nemo_minitron.train.pretrain import make_trainer, run_trainer

    model_cfg = load_model_config(checkpoint)
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    check_packing(recipe.sft)
    recipe = dataclasses.replace(recipe, model=model_cfg)
    splits = sft_splits(recipe, data, tokenizer,
                        recipe.train.seq_length or model_cfg.seq_length)
    rt = init_distributed(recipe.parallel, seed=recipe.train.seed)
    trainer = make_trainer(recipe, rt, model_cfg, tokenizer, None, out_dir,
                           init_checkpoint=checkpoint,
                           objective=lambda _model: SFTObjective(rt.device), splits=splits)
    return run_trainer(trainer, out_dir)

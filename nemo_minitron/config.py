"""Recipe dataclasses, YAML loading and ``key=value`` overrides.

A recipe is YAML with one section per dataclass below (``model``, ``parallel``, ``data``,
``train``). Every field keeps Megatron's name. Overrides use dotted keys
(``train.lr=3e-4``) and are parsed as YAML scalars. User errors raise ``ConfigError``, a
``ValueError`` whose message names the field and the rule.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml


class ConfigError(ValueError):
    """A user error in a recipe or override: the message names the field and the rule."""


T = TypeVar("T")


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of a Llama-style Megatron-core GPT model."""

    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 256
    """Width of the residual stream (embedding channels)."""
    ffn_hidden_size: int = 768
    """MLP intermediate size (per gate for SwiGLU)."""
    num_attention_heads: int = 8
    """Number of query heads."""
    num_query_groups: int | None = None
    """Number of key/value groups (GQA); None means one per head (MHA)."""
    kv_channels: int | None = None
    """Per-head dimension; None means hidden_size // num_attention_heads."""
    vocab_size: int | None = None
    """Padded vocabulary size of the embedding; None takes the tokenizer's, padded."""
    make_vocab_size_divisible_by: int = 128
    """The tokenizer's vocabulary is padded up to a multiple of this."""
    seq_length: int = 256
    """Training sequence length: the default window of training, calibration and evaluation."""
    max_position_embeddings: int | None = None
    """The model's context length (positions it supports; model metadata, exported as
    Hugging Face ``max_position_embeddings``); None: ``seq_length``."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Normalization layer type."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of the normalization layers."""
    activation: Literal["swiglu", "gelu", "squared_relu"] = "swiglu"
    """MLP activation: gated SiLU (SwiGLU, two fc1 halves), plain GeLU, or squared ReLU
    (Nemotron-4, Megatron's ``activations.squared_relu``)."""
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    """Rotary or learned absolute position embeddings."""
    rotary_base: int = 10000
    """RoPE base frequency."""
    rope_scaling_factor: float | None = None
    """Llama 3.1 RoPE frequency scaling (Megatron's ``rope_scaling``: low/high frequency
    factors 1 and 4, original context 8192) with this factor; None: plain RoPE."""
    share_embeddings_and_output_weights: bool = False
    """Tie the output layer to the word embeddings."""
    add_bias_linear: bool = False
    """Biases on every linear layer."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection only (Qwen2 style)."""
    init_method_std: float = 0.02
    """Standard deviation of the weight initialisation."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "seq_length", "make_vocab_size_divisible_by"):
            _positive(f"model.{name}", getattr(self, name))
        if self.num_query_groups is not None:
            _positive("model.num_query_groups", self.num_query_groups)
            if self.num_attention_heads % self.num_query_groups:
                raise ConfigError(
                    f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                    f"model.num_query_groups={self.num_query_groups}"
                )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels"
            )
        if self.vocab_size is not None:
            _positive("model.vocab_size", self.vocab_size)
        if self.max_position_embeddings is not None:
            _positive("model.max_position_embeddings", self.max_position_embeddings)
            if (self.position_embedding_type == "learned_absolute"
                    and self.seq_length > self.max_position_embeddings):
                raise ConfigError(f"model.seq_length={self.seq_length} exceeds the learned "
                                  f"position table, model.max_position_embeddings="
                                  f"{self.max_position_embeddings}")

    def check_layout(self, tp: int, pp: int) -> None:
        """One-line error unless every sharded dim divides by TP and the layers by PP."""
        for name, value in (("num_attention_heads", self.num_attention_heads),
                            ("num_query_groups", self.query_groups),
                            ("ffn_hidden_size", self.ffn_hidden_size),
                            ("vocab_size", self.vocab_size)):
            if value is not None and value % tp:
                raise ConfigError(f"model.{name}={value} is not divisible by "
                                  f"parallel.tensor_model_parallel_size={tp}")
        if self.num_layers % pp:
            raise ConfigError(f"model.num_layers={self.num_layers} is not divisible by "
                              f"parallel.pipeline_model_parallel_size={pp}")

    @property
    def query_groups(self) -> int:
        """Effective number of query groups."""
        return self.num_query_groups or self.num_attention_heads

    def with_seq_length(self, seq_length: int | None) -> ModelConfig:
        """The same model run on ``seq_length``-token windows (None: unchanged); its context
        length (and so its position table) stays what it was."""
        if seq_length is None or seq_length == self.seq_length:
            return self
        return dataclasses.replace(self, seq_length=seq_length,
                                   max_position_embeddings=self.context_length)

    @property
    def context_length(self) -> int:
        """Effective maximum positions (``max_position_embeddings`` or ``seq_length``)."""
        return self.max_position_embeddings or self.seq_length

    @property
    def head_dim(self) -> int:
        """Effective per-head dimension (``kv_channels``)."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformer_config(cls, config: Any, **fields: Any) -> ModelConfig:
        """The config of a megatron-core ``TransformerConfig`` a user built; ``fields``: the
        ``GPTModel`` arguments (``vocab_size``, ``seq_length``, ``rotary_base``, ...; see
        ``model.build.model_config``)."""
        from nemo_minitron.model.build import model_config

        return model_config(config, **fields)

    def to_transformer_config(self, *, bf16: bool = False, fp8: str | None = None) -> Any:
        """Megatron's ``TransformerConfig`` for this model under the current parallel state,
        as ``build_model`` makes it (``model.build.transformer_config``: no dropout, unfused
        kernels)."""
        from nemo_minitron.model.build import transformer_config

        return transformer_config(self, bf16=bf16, fp8=fp8)

    def padded_vocab_size(self, tokenizer_vocab_size: int) -> int:
        """Round a tokenizer vocabulary up to ``make_vocab_size_divisible_by``."""
        from nemo_minitron.model.layouts import padded_vocab_size

        return padded_vocab_size(tokenizer_vocab_size, self.make_vocab_size_divisible_by)


@dataclass(kw_only=True)
class ParallelConfig:
    """Model-parallel layout; the data-parallel size is world_size / (TP * PP)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (TP)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (PP)."""

    def __post_init__(self) -> None:
        _positive("parallel.tensor_model_parallel_size", self.tensor_model_parallel_size)
        _positive("parallel.pipeline_model_parallel_size", self.pipeline_model_parallel_size)

    @property
    def model_parallel_size(self) -> int:
        """TP * PP."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size


@dataclass(kw_only=True)
class DataConfig:
    """Where training tokens come from."""

    path: str | None = None
    """Indexed-dataset prefix (without .bin/.idx); None builds the embedded corpus, tokenized
    by the checkpoint's own tokenizer when a verb reads a checkpoint. A dataset written by
    another tokenizer than the one reading it is refused (``data.resolve``)."""
    tokenizer: str | None = None
    """Tokenizer: a sentencepiece .model file or a Hugging Face tokenizer directory; None
    trains a sentencepiece BPE model on the embedded corpus. Verbs that read a checkpoint use
    its tokenizer (this one, if set, must equal it)."""
    cache_dir: str = "~/.cache/nemo_minitron"
    """Where the embedded corpus, its tokenizer and its indexed dataset are built once."""
    tokenizer_vocab_size: int = 4000
    """Vocabulary of the sentencepiece model trained on the embedded corpus."""
    corpus_max_bytes: int = 8_000_000
    """Upper bound on the embedded corpus size (standard-library source, sorted by path)."""
    split: str = "95,5,0"
    """Train/valid/test split weights of the documents (Megatron's ``split``)."""
    seed: int = 1234
    """Seed of Megatron's dataset shuffling."""

    def __post_init__(self) -> None:
        _positive("data.tokenizer_vocab_size", self.tokenizer_vocab_size)
        _positive("data.corpus_max_bytes", self.corpus_max_bytes)
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            raise ConfigError(f"data.split={self.split!r} must be three numbers 'train,valid,test'")
        if sum(float(p) for p in parts) <= 0:
            raise ConfigError(f"data.split={self.split!r} must give some documents a split "
                              "(the weights sum to 0)")


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop (pretraining, fine-tuning and, later, distillation)."""

    micro_batch_size: int = 8
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    train_iters: int = 100
    """Optimizer steps."""
    seq_length: int | None = None
    """Training window (tokens per sequence); None: ``model.seq_length``. Lets ``distill`` and
    fine-tuning of an imported model train on windows shorter than its context."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Final learning rate of the cosine decay."""
    lr_warmup_iters: int = 10
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    bf16: bool | None = None
    """bf16 mixed precision; None means on with a GPU, off (fp32) on CPU."""
    seed: int = 1234
    """Seed of weight initialisation and of every RNG."""
    log_interval: int = 10
    """Steps between log lines (loss, tokens/s, ETA)."""
    eval_interval: int = 50
    """Steps between validation runs (0 disables periodic validation)."""
    eval_iters: int = 4
    """Validation batches (of global_batch_size sequences) per validation run."""
    save_interval: int = 0
    """Steps between checkpoints (0: only the final checkpoint and on SIGTERM/SIGUSR1)."""
    exit_interval: int = 0
    """Save and stop when the step is a multiple of this (time-sliced jobs); 0 disables."""
    tensorboard: bool = True
    """Write TensorBoard scalars under <out>/tensorboard."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "train_iters", "log_interval",
                     "eval_iters"):
            _positive(f"train.{name}", getattr(self, name))
        if self.seq_length is not None:
            _positive("train.seq_length", self.seq_length)
        for name in ("lr_warmup_iters", "eval_interval", "save_interval", "exit_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        for name in ("lr", "min_lr", "weight_decay", "clip_grad"):
            value = getattr(self, name, 0.0)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"train.{name}={value} must be a finite number")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"train.lr={self.lr}, train.min_lr={self.min_lr}: need "
                              "0 <= min_lr <= lr and lr > 0")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size={self.micro_batch_size}"
            )


@dataclass(kw_only=True)
class StageRecipe:
    """What every verb's recipe holds: the parallel layout and the data. Each verb's recipe
    derives from it and adds its own sections (``Recipe``: model + train; the prune, distill
    and search recipes: their sections); every section validates itself when it is built,
    the recipe checks what spans sections."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training (or calibration) data."""


@dataclass(kw_only=True)
class Recipe(StageRecipe):
    """A training recipe (pretrain, finetune): model shape and training loop."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape (used when a stage builds a model from scratch)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""

    def validate_parallel(self, world_size: int) -> int:
        """Check the layout against the world size and the model; return the DP size."""
        p, m = self.parallel, self.model
        mp = p.model_parallel_size
        if world_size % mp:
            raise ConfigError(
                f"parallel: tensor_model_parallel_size * pipeline_model_parallel_size = {mp} "
                f"does not divide the world size {world_size}"
            )
        m.check_layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
        dp = world_size // mp
        t = self.train
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size * data-parallel size = {t.micro_batch_size * dp}"
            )
        return dp


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive number")


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "",
              base: T | None = None) -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types; keys
    a class renamed (its ``DEPRECATED_KEYS``, old -> new) are read with a warning. Keys not
    given keep ``base``'s values, and a nested section keeps its field's own default (a
    ``default_factory`` may differ from the section class's defaults: ``retrain.lr=...`` must
    not reset the rest of the bench's retraining schedule to ``TrainConfig``'s)."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for old, new in getattr(cls, "DEPRECATED_KEYS", {}).items():
        if old in data:
            if new in data:
                raise ConfigError(f"'{prefix}{old}' is the deprecated name of '{prefix}{new}'; "
                                  "give only the new one")
            warnings.warn(f"'{prefix}{old}' is deprecated; use '{prefix}{new}'", FutureWarning,
                          stacklevel=2)
            data = {(new if k == old else k): v for k, v in data.items()}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"unknown key '{prefix}{key}' (known: {', '.join(sorted(fields))})"
            )
        default = getattr(base, key) if base is not None else _section_default(fields[key])
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", default)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _section_default(f: dataclasses.Field) -> Any:
    """A field's default when it is a dataclass instance (a nested section), else None."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return value if dataclasses.is_dataclass(value) and not isinstance(value, type) else None


def _coerce(tp: Any, value: Any, name: str, default: Any = None) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{name}.",
                         base=default if isinstance(default, tp) else None)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name, default)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}={value!r} has the wrong type")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}={value!r} must be one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}={value!r} must be a list")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} must be a string")
        return value
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain nested dict (YAML/JSON safe)."""
    return dataclasses.asdict(obj)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=3e-4", "model.num_layers=2"]`` -> nested dict with YAML-typed values."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        # YAML reads "3e-4" as a string; accept it as a number.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else value
            except ValueError:
                pass
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[leaf] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base``."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def recipe_path(path: str | Path) -> Path:
    """``path``; a bare file name that is not here names a recipe shipped with the package
    (``tiny_cpu.yaml``, see ``utils.paths.recipes_dir``)."""
    p = Path(path)
    if not p.is_file() and p.name == str(path):
        from nemo_minitron.utils.paths import recipes_dir

        shipped = recipes_dir() / p.name
        if shipped.is_file():
            return shipped
    return p


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (``recipe_path``), with one-line errors for a missing or malformed
    file."""
    p = recipe_path(path)
    if p.is_dir():
        raise ConfigError(f"recipe {str(path)!r} is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping of sections")
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | None = None,
                cls: type[T] = Recipe) -> T:  # type: ignore[assignment]
    """Load a recipe file (or defaults when ``path`` is None) and apply overrides. A
    ``cluster:`` section holds the job's resources for ``launch``/``validate``
    (``launch.sbatch.ClusterConfig``, checked there); the verb itself ignores it."""
    data = load_yaml(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides or []))
    data.pop("cluster", None)
    return from_dict(cls, data)

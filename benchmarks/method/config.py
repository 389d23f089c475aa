"""The method benchmark's recipe (``recipes/method_bench.yaml``): the teacher to pretrain, the
pruned shapes, the retraining budget every arm shares, and the seeds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from nemo_minitron.config import (
    ConfigError,
    Recipe,
    TrainConfig,
    from_dict,
    load_yaml,
    merge,
    parse_overrides,
)
from nemo_minitron.distill.objective import KDConfig
from nemo_minitron.distill.on_policy import OnPolicyConfig
from nemo_minitron.eval.bench import BenchConfig
from nemo_minitron.eval.generate import SamplingConfig
from nemo_minitron.eval.specdec_run import SpecDecConfig
from nemo_minitron.merge.config import MergeConfig
from nemo_minitron.prune.stage import CalibConfig
from nemo_minitron.selfdistill.stage import SelfDistillConfig, rewrite_sampling
from nemo_minitron.utils.paths import recipes_dir

TEACHER_RECIPE = recipes_dir() / "tiny_cpu.yaml"
DEFAULT_RECIPE = recipes_dir() / "method_bench.yaml"

SECTIONS = ("teacher", "aggregation", "criteria", "width_depth", "kd_vs_ce", "intermediate",
            "scratch", "iterative", "throughput", "sdd", "merge", "specdec", "recovery", "moe",
            "hetero")
INSTRUCT_SECTIONS = ("sdd", "merge", "specdec", "recovery")
"""Sections of the instruction-following chain (``instruct``, ``tune``, ``sft``, ``rewrite``,
``specdec``, ``merge``, ``ikd`` and ``onpolicy`` of the recipe)."""
DEFAULT_SECTIONS = [s for s in SECTIONS if s not in ("recovery", "moe", "hetero")]
"""``recovery`` (five recovery methods of a pruned instruction model) is asked for by name:
it is the real-teacher study's (``recipes/method_bench_smollm2_instruct.yaml``); so is ``moe``,
which needs a mixture-of-experts teacher (``recipes/method_bench_moe.yaml``), and ``hetero``
(heterogeneous vs uniform pruning, ``docs/results/hetero-miniature``)."""


def _retrain() -> TrainConfig:
    return TrainConfig(train_iters=200, lr=1e-3, min_lr=1e-4, lr_warmup_iters=10,
                       eval_interval=25, eval_iters=8, log_interval=25)


def _sft(steps: int, every: int) -> TrainConfig:
    # Full fine-tuning of a tiny CPU model: recipes/sft.yaml's schedule at a tiny model's LR.
    return TrainConfig(train_iters=steps, lr=1e-3, min_lr=1e-4, lr_warmup_iters=10,
                       weight_decay=0.0, eval_interval=every, eval_iters=4,
                       log_interval=25, save_interval=0)


def _onpolicy() -> KDConfig:
    # TRL's GKD defaults: lambda (the sampled share) 0.5, generalized JSD at beta 0.5.
    return KDConfig(divergence="gjsd", beta=0.5, on_policy=OnPolicyConfig(
        fraction=0.5, sampling=SamplingConfig(greedy=False, max_new_tokens=128)))


def _rewrite() -> SelfDistillConfig:
    return SelfDistillConfig(sampling=rewrite_sampling(max_new_tokens=128), verifier="code")


@dataclass(kw_only=True)
class InstructConfig:
    """The instruction-following chain of the ``sdd``, ``merge`` and ``specdec`` sections: the
    embedded instruction set (the standard library's documented functions as "write the
    function" tasks, held out by source file), the windows, and what is measured."""

    max_chars: int = 600
    """Longest instruction + reference answer (characters) taken from the embedded set."""
    valid_fraction: float = 0.1
    """Share of the embedded set held out (whole source files, seeded by teacher.data.seed)."""
    seq_length: int = 384
    """Window of the instruction tuning, and so the context of the instruction-tuned teacher and
    of every student pruned from it (RoPE: it may exceed the pretraining window)."""
    train_examples: int = 256
    """Training instructions used, the first that fit in the set's order; 0: every one that
    fits. An instruction fits when its SFT window, its rewrite prompt plus
    rewrite.sampling.max_new_tokens, and its prompt plus instruct.max_new_tokens fit seq_length."""
    eval_examples: int = 40
    """Held-out instructions of the task loss (the first that fit)."""
    gen_prompts: int = 16
    """Held-out instructions answered greedily (the first of the task-loss set): the verifier's
    pass rate and the speculative-decoding prompts."""
    max_new_tokens: int = 128
    """Tokens generated per held-out answer and per speculative-decoding prompt."""
    num_layers: int | None = None
    """Layers of the depth-pruned student (angular distance, arXiv 2410.09982); None: 80% of
    the teacher's, rounded (32 -> 26 as published, 4 -> 3), at least one fewer."""
    tune: bool = True
    """Instruction-tune the teacher first (the ``tune`` loop); false: the teacher is already
    instruction-tuned (e.g. SmolLM2-135M-Instruct) and is itself the tuned teacher."""

    def __post_init__(self) -> None:
        for name in ("max_chars", "seq_length", "eval_examples", "gen_prompts",
                     "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"instruct.{name}={getattr(self, name)} must be >= 1")
        if self.train_examples < 0:
            raise ConfigError(f"instruct.train_examples={self.train_examples} must be >= 0")
        if not 0 < self.valid_fraction < 1:
            raise ConfigError(f"instruct.valid_fraction={self.valid_fraction} must be in (0, 1)")
        if self.gen_prompts > self.eval_examples:
            raise ConfigError(f"instruct.gen_prompts={self.gen_prompts} must be <= "
                              f"instruct.eval_examples={self.eval_examples} (a subset of it)")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError(f"instruct.num_layers={self.num_layers} must be >= 1")


@dataclass(kw_only=True)
class MoEStudyConfig:
    """The ``moe`` section: four ways to cut a mixture-of-experts teacher to one total
    parameter count (``benchmarks/method/moe.py``)."""

    num_moe_experts: int | None = None
    """Experts per layer the experts arm keeps (it sets the parameter count of every arm);
    None: 3/4 of the teacher's (128 -> 96 as published)."""
    moe_ffn_hidden_size_step: int = 8
    """The expert-width arm's moe_ffn_hidden_size is a multiple of this."""
    hidden_size_step: int = 8
    """The hidden-size arm's hidden_size is a multiple of this."""

    def __post_init__(self) -> None:
        if self.num_moe_experts is not None and self.num_moe_experts < 1:
            raise ConfigError(f"moe.num_moe_experts={self.num_moe_experts} must be >= 1")
        for name in ("moe_ffn_hidden_size_step", "hidden_size_step"):
            if getattr(self, name) < 1:
                raise ConfigError(f"moe.{name}={getattr(self, name)} must be >= 1")


@dataclass(kw_only=True)
class StudyConfig:
    """What is compared, and how often."""

    teacher: str | None = None
    """An existing teacher checkpoint (trained with the ``teacher`` recipe's data); None
    pretrains one under ``<out>/teacher`` (resumed when interrupted)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Seed offsets of the key comparisons: each moves data.seed (calibration set, training
    order) and train.seed. Every loss in the report is measured on one fixed validation set."""
    depth_num_layers: int | None = None
    """Layers of the depth-pruned student; None: half the teacher's."""
    width_hidden_size: int | None = None
    """hidden_size of the width-pruned student (its ffn_hidden_size is then chosen so that it has
    the depth student's parameter count); None: 3/4 of the teacher's."""
    width_ffn_hidden_size_step: int = 64
    """The width student's ffn_hidden_size is a multiple of this."""
    hidden_weight: float = 1.0
    """kd.hidden_weight of the logit+intermediate arm (cosine loss on every mapped layer)."""
    iterative_steps: int = 2
    """Prune-and-re-estimate rounds of the iterative-importance arm (widths evenly spaced)."""
    scratch_full_seeds: int = 1
    """Seeds of the from-scratch run with the teacher's whole token budget (the most
    expensive arm; the equal-budget scratch run uses every seed)."""
    eval_samples: int = 64
    """Sequences of the fixed validation set (equal to retrain eval_iters x global_batch_size,
    so training curves at the first seed are on the same set)."""
    sections: list[str] = field(default_factory=lambda: list(DEFAULT_SECTIONS))
    """Sections to run and report (default: all but ``recovery`` and ``hetero``)."""
    report_note: str = ""
    """A sentence for the report's header: how the machine was (shared or quiet), and so
    what the timings are worth."""

    DEPRECATED_KEYS: ClassVar[dict[str, str]] = {
        "width_ffn_step": "width_ffn_hidden_size_step"}
    """Old recipe keys still read (with a warning) under their Megatron names."""

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"study.seeds={self.seeds} must be distinct and non-empty")
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"study.sections names {unknown[0]!r}; known: {', '.join(SECTIONS)}")
        if self.iterative_steps < 2:
            raise ConfigError(f"study.iterative_steps={self.iterative_steps} must be >= 2")
        if not 1 <= self.scratch_full_seeds <= len(self.seeds):
            raise ConfigError(f"study.scratch_full_seeds={self.scratch_full_seeds} must be "
                              f"between 1 and len(study.seeds)={len(self.seeds)}")


@dataclass(kw_only=True)
class MethodBenchRecipe:
    """Everything ``bench-method`` reads."""

    study: StudyConfig = field(default_factory=StudyConfig)
    """Arms, seeds, shapes."""
    teacher: Recipe = field(default_factory=Recipe)
    """Pretraining recipe of the teacher (defaults: ``recipes/tiny_cpu.yaml``); its ``data``
    is every stage's data."""
    calib: CalibConfig = field(default_factory=CalibConfig)
    """Importance estimation of every prune."""
    retrain: TrainConfig = field(default_factory=_retrain)
    """The loop of every retraining arm (distillation, cross-entropy, equal-budget scratch)."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Distillation losses of the logit-only arms."""
    throughput: BenchConfig = field(default_factory=BenchConfig)
    """Sizes of the throughput measurement."""
    instruct: InstructConfig = field(default_factory=InstructConfig)
    """Instruction data and measurements of the ``sdd``, ``merge`` and ``specdec`` sections."""
    tune: TrainConfig = field(default_factory=lambda: _sft(200, 50))
    """Instruction tuning of the pretrained teacher (SFT on the instruction training set)."""
    sft: TrainConfig = field(default_factory=lambda: _sft(100, 25))
    """Every fine-tuning arm of the pruned student (original answers, self-distilled answers,
    each merge parent): the same steps for all."""
    rewrite: SelfDistillConfig = field(default_factory=_rewrite)
    """Self-data distillation: how the instruction-tuned teacher rewrites the answers (its seed
    moves with the study's seed; verifier ``code``: the rewrite defines the function)."""
    ikd: KDConfig = field(default_factory=KDConfig)
    """KD on instruction data, the ``recovery`` section's arm: the tuned teacher's divergence
    on the response tokens of the windows ``sft`` trains on (``distill instruct.data``), the
    ``sft`` loop."""
    onpolicy: KDConfig = field(default_factory=_onpolicy)
    """On-policy distillation (GKD), the ``recovery`` section's arm: as ``ikd`` with a share
    ``on_policy.fraction`` of the micro-batches answered by the student itself (default:
    TRL's GKD defaults, 0.5 and generalized JSD at beta 0.5)."""
    merge: MergeConfig = field(default_factory=MergeConfig)
    """How the two merge parents are merged (default SLERP at t=0.5, as published)."""
    specdec: SpecDecConfig = field(default_factory=SpecDecConfig)
    """Speculative decoding of the instruction-tuned teacher with each draft (greedy); the
    verdict reads the first K of draft_tokens."""
    moe: MoEStudyConfig = field(default_factory=MoEStudyConfig)
    """The ``moe`` section's arms (its teacher: ``teacher.model`` with ``num_moe_experts``, or
    an MoE ``study.teacher``)."""

    def __post_init__(self) -> None:
        for name in ("retrain", "tune", "sft"):
            t = getattr(self, name)
            if not t.eval_interval or t.train_iters % t.eval_interval:
                raise ConfigError(f"{name}.eval_interval={t.eval_interval} must be > 0 and "
                                  f"divide {name}.train_iters={t.train_iters} (curves end at "
                                  "the last step)")
        if self.ikd.on_policy.fraction > 0:
            raise ConfigError("ikd.on_policy.fraction must be 0: the on-policy arm is "
                              "onpolicy.on_policy")
        if self.onpolicy.on_policy.fraction == 0:
            raise ConfigError("onpolicy.on_policy.fraction=0 samples nothing: it must be in "
                              "(0, 1]")
        if "moe" in self.study.sections and self.study.teacher is None \
                and self.teacher.model.num_moe_experts is None:
            raise ConfigError("study.sections has moe, which needs a mixture-of-experts "
                              "teacher: set teacher.model.num_moe_experts (or study.teacher "
                              "to an MoE checkpoint)")
        if self.merge.method == "task":
            raise ConfigError("merge.method='task' needs a common base model; the merge "
                              "section merges its two parents by slerp (or linear)")


def load_bench_recipe(path: str | Path | None, overrides: list[str]) -> MethodBenchRecipe:
    """The teacher section starts from ``recipes/tiny_cpu.yaml``; then the recipe, then
    ``key=value`` overrides."""
    teacher = load_yaml(TEACHER_RECIPE)
    teacher.pop("cluster", None)  # launch's job resources, not a recipe section
    data: dict[str, Any] = {"teacher": teacher}
    data = merge(data, load_yaml(path or DEFAULT_RECIPE))
    data = merge(data, parse_overrides(overrides))
    return from_dict(MethodBenchRecipe, data)

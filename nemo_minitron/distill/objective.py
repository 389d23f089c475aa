"""The distillation objective: a frozen teacher and the student in one pipeline schedule.

It plugs into the ordinary training loop (``train.loop.Trainer``) as an ``Objective``. Per
micro-batch the teacher runs without gradients, then the student; on the last stage the loss
combines the logit divergence, optional ground-truth cross-entropy and intermediate losses.
The per-token logit terms run inside the student's forward (``MinitronGPTModel``'s
``logits_loss``), on its logits as Megatron's output layer writes them, ``[s, b, v/TP]``, beside
the teacher's batch-first logits seen through a transposed view: no logits-sized copy either
way. Another ``GPTModel`` as the student returns ``[b, s, v]`` logits; the same terms read them
through a transposed view.

Pipeline parallelism: teacher and student are split into the same number of stages. Between
stages one tensor travels: ``[s, b, h_student + h_teacher]``, the two hidden states side by
side (``adjust_tensor_shapes`` tells Megatron's schedule its size). A stage splits it, feeds
each model its half and sends the concatenation on; gradients only flow through the student's
half. Intermediate losses of layer pairs that live on an earlier stage are added to that stage's
backward pass (``_AddLoss``) and reported through ``pop_stage_metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch

from nemo_minitron.config import ConfigError
from nemo_minitron.data.instruct import sft_attention_mask
from nemo_minitron.distill.cache_format import TeacherCache
from nemo_minitron.distill.cache_kl import cached_forward_kl
from nemo_minitron.distill.losses import (
    ChunkTokens,
    Divergence,
    hidden_state_loss,
    logit_divergence,
    logit_divergence_and_ce,
    one_process,
    token_cross_entropy,
)
from nemo_minitron.distill.on_policy import OnPolicyConfig, OnPolicySampler
from nemo_minitron.model.build import unwrap
from nemo_minitron.model.gpt import MinitronGPTModel
from nemo_minitron.model.layouts import drop_vocab_padding, global_layers
from nemo_minitron.train.objectives import Objective, masked_mean, to_device


@dataclass(kw_only=True)
class KDConfig:
    """Distillation losses and their weights."""

    divergence: Divergence = "forward"
    """Logit divergence: forward KL(teacher || student), reverse KL, js (Jensen-Shannon), or
    gjsd (generalized JSD with ``beta``, GKD's loss)."""
    beta: float = 0.5
    """gjsd only, in [0, 1]: the mixture m = beta p_teacher + (1 - beta) p_student and
    beta KL(teacher || m) + (1 - beta) KL(student || m); 0 is forward KL, 1 reverse KL (TRL's
    GKD convention)."""
    temperature: float = 1.0
    """Softmax temperature T of both models; the loss is multiplied by T^2."""
    top_k: int | None = None
    """Keep only the teacher's k most likely tokens (renormalised); forward KL only."""
    chunk_tokens: ChunkTokens = "auto"
    """Tokens per chunk of the logit loss (bounds its memory): a number; null: all at once;
    auto: from the vocabulary slice and the device (``distill.losses.chunk_rows``)."""
    logit_weight: float = 1.0
    """Weight of the logit divergence."""
    lm_loss_weight: float = 0.0
    """Weight of the cross-entropy on the ground truth (the method uses 0: KD alone)."""
    hidden_weight: float = 0.0
    """Weight of the intermediate hidden-state loss (0: off), mean over mapped layer pairs."""
    hidden_loss: Literal["cosine", "mse"] = "cosine"
    """Intermediate loss: 1 - cosine similarity or mean squared error per token."""
    layer_map: list[list[int]] | None = None
    """``[[student_layer, teacher_layer], ...]`` (0-based, layer outputs); null: from the
    pruning (each student layer maps to the teacher layer it was cut from)."""
    embedding_weight: float = 0.0
    """Weight of the embedding-output loss (same form as hidden_loss); 0: off."""
    balance: Literal["static", "magnitude"] = "static"
    """static: weights as given. magnitude: intermediate losses rescaled per micro-batch to the
    logit loss' magnitude, then weighted (needs the mapped layers on the last stage)."""
    teacher_max_loss_ratio: float = 0.9
    """Refuse to start if the teacher's validation loss exceeds this fraction of ln(vocab)."""
    teacher_cache: str | None = None
    """A teacher top-k log-probability cache (``nemo-minitron teacher-cache``) read instead of
    running the teacher: forward KL on the cached top-k plus a tail bucket (exact when k covers
    the vocabulary; see ``distill.cache_kl``). Logit loss only, T=1, PP=1."""
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """On-policy distillation: a share of micro-batches on the student's own samples
    (``distill.on_policy``)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:  # also rejects NaN
            raise ConfigError(f"kd.beta={self.beta} must be in [0, 1]")
        if self.chunk_tokens is not None and self.chunk_tokens != "auto" and (
                isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int)
                or self.chunk_tokens < 1):
            raise ConfigError(f"kd.chunk_tokens={self.chunk_tokens!r} must be an integer >= 1, "
                              "auto or null")
        if self.temperature <= 0:
            raise ConfigError(f"kd.temperature={self.temperature} must be > 0")
        if self.top_k is not None and (self.top_k < 1 or self.divergence != "forward"):
            raise ConfigError(f"kd.top_k={self.top_k} must be >= 1 and needs "
                              "kd.divergence=forward")
        for name in ("logit_weight", "lm_loss_weight", "hidden_weight", "embedding_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"kd.{name}={getattr(self, name)} must be >= 0")
        if self.logit_weight + self.lm_loss_weight + self.hidden_weight \
                + self.embedding_weight == 0:
            raise ConfigError("kd: every loss weight is 0")
        if self.teacher_cache is not None:  # the cache holds top-k log-probs at T=1 only
            for name, have, want in (("divergence", self.divergence, "forward"),
                                     ("temperature", self.temperature, 1.0),
                                     ("top_k", self.top_k, None),
                                     ("hidden_weight", self.hidden_weight, 0.0),
                                     ("embedding_weight", self.embedding_weight, 0.0)):
                if have != want:
                    raise ConfigError(f"kd.teacher_cache needs kd.{name}={want} (the cache "
                                      f"holds the teacher's top-k log-probabilities at T=1, "
                                      f"no hidden states); got {have}")


class _AddLoss(torch.autograd.Function):
    """Identity on ``out``; in backward also sends ``scale`` as the gradient of ``loss``, which
    adds ``scale * loss`` to the objective of a stage that has no loss function."""

    @staticmethod
    def forward(ctx, out, loss, scale):  # type: ignore[override]
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, torch.full((), ctx.scale, device=grad.device), None


def _capture(module: torch.nn.Module, store: dict[str, torch.Tensor], key: str,
             sequence_parallel: bool):
    """Keep ``module``'s output in ``store[key]``, all of the sequence: a model under sequence
    parallelism holds its shard, gathered here. The loss on it is then the same on every
    tensor-parallel rank, so the gather's backward takes this rank's slice of the gradient
    (not a sum over the ranks)."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    def hook(_m, _args, out):
        out = out[0] if isinstance(out, tuple) else out
        store[key] = gather_from_sequence_parallel_region(
            out, tensor_parallel_output_grad=False) if sequence_parallel else out
    return module.register_forward_hook(hook)


class KDObjective(Objective):
    """Teacher + student forward, distillation loss on the last stage."""

    def __init__(self, teacher: torch.nn.Module | None, student: torch.nn.Module, cfg: KDConfig,
                 device: torch.device, *, pairs: list[tuple[int, int]],
                 shared_vocab: int | None = None, num_microbatches: int = 1,
                 cache: TeacherCache | None = None, sampler: OnPolicySampler | None = None):
        from megatron.core import parallel_state as ps

        self.teacher, self.cfg, self.device, self.cache = teacher, cfg, device, cache
        self.sampler = sampler  # on-policy distillation: the student's samples
        self.student = unwrap(student)
        self.shared_vocab = shared_vocab
        self.num_microbatches = num_microbatches
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.is_last = ps.is_pipeline_last_stage()
        self.h_student = self.student.config.hidden_size
        self._acts: dict[str, torch.Tensor] = {}
        self._stage_sums: dict[str, float] = {}
        if cache is not None:  # the teacher's logits come from the cache: no teacher at all
            if ps.get_pipeline_model_parallel_world_size() > 1:
                raise ConfigError("kd.teacher_cache needs pipeline_model_parallel_size=1")
            self.pairs, self.n_pairs, self.use_embedding, self._hooks = [], 0, False, []
            self.metric_names = ["loss", "kd loss", "lm loss"]
            return
        assert teacher is not None
        s_sp, t_sp = self.student.config.sequence_parallel, teacher.config.sequence_parallel
        if s_sp != t_sp and ps.get_pipeline_model_parallel_world_size() > 1:
            raise ConfigError("under pipeline parallelism teacher and student must both use "
                              "sequence parallelism or neither (their hidden states travel "
                              f"together); student {s_sp}, teacher {t_sp}")
        self.h_teacher = teacher.config.hidden_size
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        s_layers, t_layers = global_layers(self.student), global_layers(teacher)
        self.pairs = [(s, t) for s, t in pairs if s in s_layers and t in t_layers] \
            if cfg.hidden_weight else []
        self.n_pairs = len(pairs) if cfg.hidden_weight else 0
        if cfg.balance == "magnitude" and not self.is_last and self.pairs:
            raise ConfigError("kd.balance=magnitude needs every mapped layer on the last "
                              "pipeline stage; use kd.balance=static")
        self._hooks = []
        for s, t in self.pairs:
            self._hooks += [_capture(s_layers[s], self._acts, f"s{s}", s_sp),
                            _capture(t_layers[t], self._acts, f"t{t}", t_sp)]
        self.use_embedding = cfg.embedding_weight > 0 and hasattr(self.student, "embedding")
        if self.use_embedding:
            self._hooks += [_capture(self.student.embedding, self._acts, "s_emb", s_sp),
                            _capture(teacher.embedding, self._acts, "t_emb", t_sp)]
        self.metric_names = ["loss", "kd loss", "lm loss"]
        if cfg.hidden_weight:
            self.metric_names.append("hidden loss")
        if cfg.embedding_weight:
            self.metric_names.append("embedding loss")

    # ------------------------------------------------------------------ plumbing
    def adjust_tensor_shapes(self, recv: list, send: list) -> tuple[list, list]:
        """Pipeline tensors carry both hidden states: ``[s, b, h_student + h_teacher]``."""
        grow = lambda shapes: [(*s[:-1], self.h_student + self.h_teacher) for s in shapes]  # noqa: E731
        return grow(recv), grow(send)

    def pop_stage_metrics(self) -> dict[str, float]:
        """Metrics of losses computed on this (non-last) stage since the last call, as means
        over micro-batches; the trainer adds them to the last stage's."""
        out = {k: v / self.num_microbatches for k, v in self._stage_sums.items()}
        self._stage_sums = {}
        return out

    def _project(self, key: str, x: torch.Tensor) -> torch.Tensor:
        proj = getattr(self.student, "kd_projections", None)
        return proj[key](x) if proj is not None and key in proj else x

    # ------------------------------------------------------------------ one micro-batch
    def forward_step(self, data_iterator, model):
        return self.step(to_device(next(data_iterator), self.device), model)

    def step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module):
        """``(output, loss_func)`` of one micro-batch already on the device (``tokens``,
        ``position_ids``, ``labels``, ``loss_mask`` ``[b, s]``; with a cache or a sampler
        ``sample_index``; packed instruction windows ``segment_ids``)."""
        if self.sampler is not None and model.training:
            batch = self.sampler(batch, self.student)
        tokens, pos = batch["tokens"], batch["position_ids"]
        seg = batch.get("segment_ids")
        attn = sft_attention_mask(seg) if seg is not None else None  # packed: per example
        received = self.student.decoder.input_tensor
        if received is not None:  # a later stage: split the pair of hidden states
            self.student.decoder.set_input_tensor(received[..., :self.h_student])
            self.teacher.set_input_tensor(received[..., self.h_student:])
        self._acts.clear()
        if self.cache is not None:
            cache = self.cache if model.training else self.cache.valid  # the loop's eval()
            if cache is None:
                raise ConfigError(f"teacher cache {str(self.cache.path)!r} holds no validation "
                                  "samples: rebuild it with validation, or set "
                                  "train.eval_interval=0")
            # [b, s, k] -> [s, b, k] like the student's logits (k << vocabulary: a small copy)
            cached = [a.transpose(0, 1).contiguous()
                      for a in cache.rows(batch["sample_index"], tokens, self.device)]
            terms = partial(self._cached_terms, cached)
        else:
            assert self.teacher is not None
            with torch.no_grad():
                t_out = self.teacher(tokens, pos, attn)
            terms = partial(self._logit_terms, t_out.transpose(0, 1))  # a [s, b, v] view
        if self.is_last and isinstance(self.student, MinitronGPTModel):
            # The terms get the student's logits as its output layer wrote them, [s, b, v]:
            # neither they nor their gradient are copied to [b, s, v].
            s_out = model(tokens, pos, attn, labels=batch["labels"], logits_loss=terms)
            from_output = _identity
        else:  # another GPTModel returns [b, s, v] logits; on other stages, hidden states
            s_out = model(tokens, pos, attn)
            from_output = lambda out: terms(batch["labels"], out.transpose(0, 1))  # noqa: E731
        aux = self._intermediate_losses(batch["loss_mask"]) if self.cache is None else []
        if not self.is_last:
            out = torch.cat([s_out, t_out.detach()], dim=-1)
            weights = {"hidden loss": self.cfg.hidden_weight / max(self.n_pairs, 1),
                       "embedding loss": self.cfg.embedding_weight}
            for name, value in aux:
                w = weights[name]
                out = _AddLoss.apply(out, value, w / self.num_microbatches)
                v = float(value.detach())
                self._stage_sums[name] = self._stage_sums.get(name, 0.0) + v * (
                    1.0 if name == "embedding loss" else 1.0 / self.n_pairs)
                self._stage_sums["loss"] = self._stage_sums.get("loss", 0.0) + w * v
            return out, _no_loss
        return s_out, lambda out: self._loss(batch, from_output(out), aux)

    def _intermediate_losses(self, loss_mask: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        mask = loss_mask.t()  # hidden states are [s, b, h]
        out = []
        for s, t in self.pairs:
            x = self._project(f"layer{s}", self._acts[f"s{s}"])
            per = hidden_state_loss(x, self._acts[f"t{t}"], self.cfg.hidden_loss)
            out.append(("hidden loss", masked_mean(per, mask)))
        if self.use_embedding:
            x = self._project("embedding", self._acts["s_emb"])
            per = hidden_state_loss(x, self._acts["t_emb"], self.cfg.hidden_loss)
            out.append(("embedding loss", masked_mean(per, mask)))
        self._acts.clear()
        return out

    # ------------------------------------------------------------------ per-token logit terms
    # Both take the student's logits [s, b, v/TP] (any strides with contiguous rows) and
    # labels [b, s], and return per-token (distillation, cross-entropy) losses [b, s]. The
    # cross-entropy carries gradient only when kd.lm_loss_weight weights it.
    def _logit_terms(self, t_logits, labels, s_logits):
        cfg = self.cfg
        if self.shared_vocab is not None:  # TP=1 only: reconcile padded vocabularies
            s_logits = drop_vocab_padding(s_logits, self.shared_vocab)
            t_logits = drop_vocab_padding(t_logits, self.shared_vocab)
        labels = labels.t().contiguous()
        kw = dict(kind=cfg.divergence, temperature=cfg.temperature, top_k=cfg.top_k,
                  chunk_tokens=cfg.chunk_tokens, group=self._group(), beta=cfg.beta)
        if cfg.lm_loss_weight:  # the cross-entropy with gradient, computed once
            per_kd = logit_divergence(s_logits, t_logits, **kw)
            per_ce = _lm_cross_entropy(s_logits, labels)
        else:
            per_kd, per_ce = logit_divergence_and_ce(s_logits, t_logits, labels, **kw)
        return per_kd.t().contiguous(), per_ce.t().contiguous()

    def _cached_terms(self, cached, labels, s_logits):
        """Against the teacher cache: ``KL_k`` (see ``distill.cache_kl``)."""
        cfg = self.cfg
        labels = labels.t().contiguous()
        per_kd = cached_forward_kl(s_logits, *cached, chunk_tokens=cfg.chunk_tokens,
                                   group=self._group())
        per_ce = _lm_cross_entropy(s_logits, labels) if cfg.lm_loss_weight else \
            token_cross_entropy(s_logits, labels, chunk_tokens=cfg.chunk_tokens,
                                group=self._group())
        return per_kd.t().contiguous(), per_ce.t().contiguous()

    def _group(self):
        return None if one_process(self.tp_group) else self.tp_group

    def _loss(self, batch, terms, aux):
        cfg = self.cfg
        per_kd, per_ce = terms
        kd, ce = masked_mean(per_kd, batch["loss_mask"]), masked_mean(per_ce, batch["loss_mask"])
        loss = cfg.logit_weight * kd + cfg.lm_loss_weight * ce
        metrics = {"kd loss": kd.detach().clone(), "lm loss": ce.detach().clone()}
        hidden = [v for n, v in aux if n == "hidden loss"]
        if hidden:
            h = torch.stack(hidden).sum() / self.n_pairs
            scale = (kd.detach() / h.detach().clamp(min=1e-12)) \
                if cfg.balance == "magnitude" else 1.0
            loss = loss + cfg.hidden_weight * scale * h
            metrics["hidden loss"] = h.detach().clone()
        elif cfg.hidden_weight:
            metrics["hidden loss"] = torch.zeros((), device=kd.device)
        emb = [v for n, v in aux if n == "embedding loss"]
        if emb:
            loss = loss + cfg.embedding_weight * emb[0]
            metrics["embedding loss"] = emb[0].detach().clone()
        elif cfg.embedding_weight:
            metrics["embedding loss"] = torch.zeros((), device=kd.device)
        # clone: the schedule divides the returned loss in place by the micro-batch count
        metrics["loss"] = loss.detach().clone()
        return loss, metrics


def _identity(x):
    return x


def _lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Megatron's vocab-parallel cross-entropy, with gradient; it overwrites its input, which
    the divergence still needs: it gets a copy."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(
        logits.float().clone(memory_format=torch.contiguous_format), labels)


def _no_loss(output: torch.Tensor):
    raise RuntimeError("loss_func runs on the last pipeline stage only")


def add_projections(student: torch.nn.Module, teacher_hidden: int,
                    pairs: list[tuple[int, int]], embedding: bool, seed: int) -> None:
    """Learned ``Linear(h_student -> h_teacher)`` per mapped pair on this stage (and for the
    embedding output), attached to the student so DDP, the optimizer and checkpoints see them.
    Initialised from ``seed`` and the pair's name: identical on every rank and layout."""
    student = unwrap(student)
    h = student.config.hidden_size
    if h == teacher_hidden:
        return
    mine = set(global_layers(student))
    keys = [f"layer{s}" for s, _ in pairs if s in mine]
    if embedding and hasattr(student, "embedding"):
        keys.append("embedding")
    if not keys:
        return
    param = next(student.parameters())
    mods = torch.nn.ModuleDict()
    for k in keys:
        lin = torch.nn.Linear(h, teacher_hidden, bias=False)
        g = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, k)))
        with torch.no_grad():
            lin.weight.copy_(torch.randn(teacher_hidden, h, generator=g) / h**0.5)
        mods[k] = lin.to(device=param.device, dtype=param.dtype)
    student.kd_projections = mods

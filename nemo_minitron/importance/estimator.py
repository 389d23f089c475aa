"""Activation-based importance with forward hooks on a Megatron-core ``GPTModel``.

Where each axis reads its activation (``docs/method.md``):
- ``ffn_hidden_size``: input of ``mlp.linear_fc2`` (after the activation / SwiGLU gating);
- ``num_attention_heads``: input of ``self_attention.linear_proj`` viewed as
  ``[heads, kv_channels]``, norm over ``kv_channels``; a query group scores the sum of its heads;
- ``hidden_size``: outputs of ``input_layernorm`` and ``pre_mlp_layernorm`` of every layer,
  each aggregated on its own, then summed over layers;
- ``num_layers``: Block Importance, 1 - cos(layer input, layer output) averaged over tokens;
- MoE models: ``experts``, ``expert_mass``, ``expert_load``, ``expert_ffn``,
  ``expert_channels``, ``shared_expert_ffn`` from hooks on the experts (``importance/moe.py``),
  no ``ffn_hidden_size``;
- ``angular_distance``: arccos(cos)/pi between the hidden states entering every pair of layers
  (the last boundary is the final hidden state before the final norm), averaged over tokens:
  the depth criterion of self-data distillation (arXiv 2410.09982) for any block size.

Every rank scores its own shard. Collectives live in ``finalize``: data-parallel ranks sum
their running statistics; tensor-parallel shards (contiguous blocks of neurons / heads in rank
order, Megatron's layout) are concatenated; pipeline stages are concatenated by layer, and
``hidden_size`` scores summed over stages. Every rank ends with the full-model ``Scores``.
Block Importance and angular distances come from one place: every layer boundary of a
micro-batch is copied into one buffer (a layer's input is the previous layer's output, copied
once) and ``flush()`` takes cosines between all pairs from a float64 Gram matrix per token
(``layers.boundary_distance_sums``); Block Importance is the pairs of adjacent boundaries.
Hidden states are replicated over TP: each TP rank takes its share of the tokens (every
tp-th) and ``finalize`` sums over TP as over DP. Under PP each stage keeps its boundaries of a
micro-batch until ``flush()`` all-gathers them over the stages (``estimate_importance``
flushes after every micro-batch so at most one is held; leaving the ``with`` block flushes what
is still held).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from nemo_minitron.config import ConfigError
from nemo_minitron.importance.aggregate import Agg, Aggregator, gather_cat
from nemo_minitron.importance.layers import boundary_distance_sums
from nemo_minitron.importance.moe import ExpertStats
from nemo_minitron.importance.scores import Scores
from nemo_minitron.model.build import unwrap
from nemo_minitron.model.layouts import heads_by_group, split_heads


class ImportanceEstimator:
    """Context manager: hooks in while open; call ``finalize()`` after the forward passes."""

    def __init__(self, model: torch.nn.Module, batch_agg: Agg = "l2", seq_agg: Agg = "mean"):
        from megatron.core import parallel_state as ps

        self.model = unwrap(model)
        self.cfg = self.model.config
        self.layers = list(self.model.decoder.layers)
        self.batch_agg, self.seq_agg = batch_agg, seq_agg
        self.head_dim = self.cfg.kv_channels
        agg = lambda units: Aggregator(units, batch_agg, seq_agg)  # noqa: E731
        if self.cfg.sequence_parallel:  # its hooks would see sequence shards
            raise ConfigError("importance needs a model built without sequence parallelism "
                              "(build_model's default): its statistics are over whole "
                              "sequences")
        moe = self.cfg.num_moe_experts is not None
        self.moe = [ExpertStats(layer.mlp, agg) for layer in self.layers] if moe else []
        self.ffn = [] if moe else [agg(layer.mlp.linear_fc2.weight.shape[1])
                                   for layer in self.layers]
        heads_local = [layer.self_attention.linear_proj.weight.shape[1] // self.head_dim
                       for layer in self.layers]
        self.heads = [agg(h) for h in heads_local]
        h = self.cfg.hidden_size
        self.hidden = [[agg(h), agg(h)] for _ in self.layers]
        # Sums over tokens, for the whole model (every stage sees every boundary at flush).
        n = self.cfg.num_layers + 1  # layer boundaries of the whole model
        self.block = torch.zeros(n - 1, dtype=torch.float64)  # 1 - cos(layer input, output)
        self.angular = torch.zeros(n, n, dtype=torch.float64)  # arccos(cos) / pi
        self.tokens = torch.zeros(1, dtype=torch.float64)
        # This micro-batch's boundaries on this stage, [tokens, local layers + 1, hidden]: this
        # TP rank's share of the tokens, every tp-th from its rank on.
        self._tp_rank = ps.get_tensor_model_parallel_rank()
        self._tp_size = ps.get_tensor_model_parallel_world_size()
        self._bounds: torch.Tensor | None = None
        self._last_out: torch.Tensor | None = None  # output of the previous layer
        self._spare: torch.Tensor | None = None  # a flushed buffer, reused
        self._pending: list[torch.Tensor] = []  # complete stage buffers awaiting the PP gather
        self._handles: list[Any] = []
        self.num_sequences = 0

    # -------------------------------------------------------------- hooks
    def __enter__(self) -> ImportanceEstimator:
        from megatron.core import parallel_state as ps

        for stats, layer in zip(self.moe, self.layers):
            # An expert's linears are split over the expert-tensor-parallel group.
            self._handles += stats.hooks(layer.mlp, ps.get_expert_tensor_parallel_group())
        for i, layer in enumerate(self.layers):
            if not self.moe:
                self._handles.append(
                    layer.mlp.linear_fc2.register_forward_pre_hook(self._ffn_hook(i)))
            self._handles += [
                layer.self_attention.linear_proj.register_forward_pre_hook(self._head_hook(i)),
                layer.input_layernorm.register_forward_hook(self._norm_hook(i, 0)),
                layer.pre_mlp_layernorm.register_forward_hook(self._norm_hook(i, 1)),
                layer.register_forward_hook(self._block_hook(i), with_kwargs=True),
            ]
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if exc_type is None:  # every stage leaves the block here: the PP gather is safe
            self.flush()

    def _ffn_hook(self, i: int):
        def hook(_mod, args):
            self.ffn[i].update(args[0].abs())  # [s, b, ffn/tp]
        return hook

    def _head_hook(self, i: int):
        def hook(_mod, args):
            x = args[0]  # [s, b, heads/tp * kv_channels]
            self.heads[i].update(split_heads(x.float(), self.head_dim).norm(dim=-1))
        return hook

    def _norm_hook(self, i: int, which: int):
        def hook(_mod, _args, out):
            self.hidden[i][which].update(out.abs())  # [s, b, hidden], replicated over TP
        return hook

    def _block_hook(self, i: int):
        def hook(_mod, args, kwargs, out):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            y = out[0] if isinstance(out, tuple) else out
            if i == 0:
                self.num_sequences += x.shape[1]
                self._bounds = self._buffer(x)
            if self._bounds is None:
                raise RuntimeError("ImportanceEstimator: a layer ran without the stage's first")
            # Copies, not references: later layers may work in place. Megatron's block passes a
            # layer's output on as the next one's input: that boundary is already copied.
            if i == 0 or x is not self._last_out:
                self._bounds[:, i].copy_(self._my_tokens(x))
            self._bounds[:, i + 1].copy_(self._my_tokens(y))
            self._last_out = y
            if i == len(self.layers) - 1:
                self._pending.append(self._bounds)
                self._bounds = self._last_out = None
                if self._pp_size() == 1:
                    self.flush()
        return hook

    def _my_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[s, b, h]`` -> ``[tokens, h]``: this TP rank's share of the tokens."""
        return x.detach().reshape(-1, x.shape[-1])[self._tp_rank::self._tp_size]

    def _buffer(self, x: torch.Tensor) -> torch.Tensor:
        """An empty ``[tokens, local layers + 1, hidden]`` buffer for this rank's share of the
        boundaries of the micro-batch entering as ``x [s, b, h]`` (the flushed one when it
        fits)."""
        shape = (self._my_tokens(x).shape[0], len(self.layers) + 1, x.shape[2])
        spare, self._spare = self._spare, None
        if spare is not None and spare.shape == shape and spare.dtype == x.dtype \
                and spare.device == x.device:
            return spare
        return x.new_empty(shape)

    @staticmethod
    def _pp_size() -> int:
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_world_size()

    def flush(self) -> None:
        """Accumulate the angular distances of the held micro-batches (a collective over the
        pipeline stages, which all hold the same number)."""
        from megatron.core import parallel_state as ps

        pp = ps.get_pipeline_model_parallel_group()
        for local in self._pending:  # [tokens, local layers + 1, hidden]
            bounds = local
            if dist.get_world_size(pp) > 1:
                parts = [torch.empty_like(local) for _ in range(dist.get_world_size(pp))]
                dist.all_gather(parts, local, group=pp)
                # A stage's last boundary is the next stage's first: keep it once.
                bounds = torch.cat([parts[0], *(p[:, 1:] for p in parts[1:])], dim=1)
            angle, gap = boundary_distance_sums(bounds)
            self.angular += angle
            self.block += gap.diagonal(1)  # adjacent boundaries: a layer's input and output
            self.tokens += bounds.shape[0]
            self._spare = local
        self._pending = []

    # -------------------------------------------------------------- collectives
    def finalize(self, meta: dict[str, Any] | None = None) -> Scores:
        """Combine over DP, TP and PP; every rank returns the full-model scores."""
        from megatron.core import parallel_state as ps

        dp = ps.get_data_parallel_group()
        for a in [*self.ffn, *self.heads, *(x for pair in self.hidden for x in pair), *self.moe]:
            a.all_reduce(dp)
        self._spare = None
        if self._pending or self._bounds is not None:
            raise RuntimeError("ImportanceEstimator: flush() was not called after a forward pass")
        tp, pp = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
        reduce_over = [g for g in (dp, tp) if dist.get_world_size(g) > 1]  # TP: token shares
        if reduce_over:
            device = next(self.model.parameters()).device  # NCCL reduces device tensors only
            packed = torch.cat([self.block, self.angular.flatten(), self.tokens]).to(device)
            for g in reduce_over:
                dist.all_reduce(packed, group=g)
            packed = packed.cpu()
            nb = self.block.numel()
            self.block = packed[:nb]
            self.angular = packed[nb:-1].view_as(self.angular)
            self.tokens = packed[-1:]
        tokens = self.tokens.clamp(min=1)
        angular, block = (self.angular / tokens).float(), (self.block / tokens).float()
        heads = gather_cat(torch.stack([a.result() for a in self.heads]), tp, dim=1)
        heads = gather_cat(heads, pp, dim=0)
        moe: dict[str, torch.Tensor] = {}
        if self.moe:
            ffn = torch.zeros(self.cfg.num_layers, 0)  # an MoE layer has no dense MLP
            per_layer = [a.result() for a in self.moe]
            stats = gather_cat(torch.stack([r[0] for r in per_layer]), pp, dim=0)
            moe = dict(zip(("experts", "expert_mass", "expert_load"), stats.unbind(1)))
            shared = self.moe[0].shared is not None
            etp = ps.get_expert_tensor_parallel_group()  # the experts' (the shared one: TP)
            for i, name, group in ((1, "expert_ffn", etp), (3, "expert_channels", etp),
                                   (2, "shared_expert_ffn", tp))[:2 + shared]:
                # channels last: concatenated over (expert) TP; layers first: over PP
                moe[name] = gather_cat(gather_cat(torch.stack([r[i] for r in per_layer]),
                                                  group, dim=-1), pp, dim=0)
        else:
            ffn = gather_cat(torch.stack([a.result() for a in self.ffn]), tp, dim=1)
            ffn = gather_cat(ffn, pp, dim=0)
        hidden = torch.stack([a.result() + b.result() for a, b in self.hidden]).sum(0).double()
        if dist.get_world_size(pp) > 1:
            dist.all_reduce(hidden, group=pp)
        groups = self.cfg.num_query_groups or self.cfg.num_attention_heads
        query_groups = heads_by_group(heads, groups).sum(-1)
        info = {"batch_agg": self.batch_agg, "seq_agg": self.seq_agg,
                "num_sequences": self.num_sequences * dist.get_world_size(dp), **(meta or {})}
        return Scores(ffn=ffn, heads=heads,
                      groups=query_groups, hidden=hidden.float(),
                      layers=block, angular_distance=angular, meta=info, **moe)


def estimate_importance(model: torch.nn.Module,
                        forward_loop_or_batches: torch.Tensor | Iterable[torch.Tensor]
                        | Callable[[torch.nn.Module], Any], *,
                        micro_batch_size: int | None = None, batch_agg: Agg = "l2",
                        seq_agg: Agg = "mean", meta: dict[str, Any] | None = None) -> Scores:
    """Score every unit of ``model`` (this rank's stage of any TP/PP/DP layout) from forward
    passes over this rank's calibration data: tokens ``[n, s]``, an iterable of ``[b, s]``
    batches (each run through Megatron's pipeline schedule in micro-batches of
    ``micro_batch_size``, default the whole batch), or ``forward_loop(model)``, the user's own
    loop. The pipeline flush is done here (after each batch, or once after the loop). Every
    rank returns the full-model scores, with the weights' fingerprint in ``meta``."""
    from nemo_minitron.model.forward import forward_pass
    from nemo_minitron.model.params import weights_fingerprint

    data = forward_loop_or_batches
    if isinstance(data, torch.Tensor):
        # Under PP a micro-batch's hidden states meet only after its pass: one micro-batch per
        # pass bounds what the stages hold (calibration is small; the bubble costs little).
        pp = ImportanceEstimator._pp_size() > 1
        data = data.split(micro_batch_size if pp and micro_batch_size else len(data))
    with ImportanceEstimator(model, batch_agg, seq_agg) as est:
        if callable(data):
            data(model)
        else:
            for batch in data:
                forward_pass(model, batch, micro_batch_size=micro_batch_size)
                est.flush()
    return est.finalize({"fingerprint": weights_fingerprint(unwrap(model)), **(meta or {})})


def check_scores_match(scores: Scores, model: torch.nn.Module) -> None:
    """One-line error unless ``scores`` were computed on this model's weights."""
    from nemo_minitron.model.params import same_weights, weights_fingerprint

    want = scores.meta.get("fingerprint")
    if want is None:
        return  # scores from an older version or a foreign tool: shapes are checked in the plan
    have = weights_fingerprint(unwrap(model))
    if not same_weights(have, want):
        raise ConfigError(f"scores were computed on different weights (fingerprint {want} "
                          f"!= this model's {have}); recompute them without scores=")

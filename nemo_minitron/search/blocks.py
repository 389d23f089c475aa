"""The block library of the heterogeneous search and each block's score on the parent.

Every layer may keep its attention (with all or fewer query groups), replace it by a linear
layer or drop it, and likewise its MLP (all or fewer neurons, linear, no-op). A block is
scored by the KL divergence of the parent's next-token distribution from the parent's with
only that block replaced (mean over the validation tokens), one forward pass per block on the
parent itself with hooks: removed MLP neurons are zeroed at ``linear_fc2``'s input, fewer query
groups make the removed groups' heads attend with their hosts' keys and values
(``prune.hetero.regroup``: exactly the pruned layer's computation), a no-op block's output is
zero, a linear block's output is its least-squares fit (``prune.hetero.fit_linear_blocks``, on
the calibration tokens). No model is rebuilt. A layer's candidate is one attention block and
one MLP block; its score is the sum of the two blocks' scores (each measured alone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.config.hetero import LayerShape
from nemo_minitron.model.params import layer_params
from nemo_minitron.prune.hetero import head_hosts, linear_key, mlp_forward

Option = tuple[str, int | None]
"""One block of a sublayer: ``("full", size)``, ``("linear", None)`` or ``("no_op", None)``."""


def _full_fractions() -> list[float]:
    return [1.0, 0.75, 0.5, 0.25]


def _group_fractions() -> list[float]:
    return [1.0, 0.5]


@dataclass(kw_only=True)
class BlockLibrary:
    """The candidate blocks of every layer (``search.blocks``)."""

    ffn_hidden_size_fractions: list[float] = field(default_factory=_full_fractions)
    """MLP widths to try, as fractions of the source's ``ffn_hidden_size`` (each rounded down
    to a multiple of the tensor-parallel size; 1.0 is the source's MLP)."""
    num_query_groups_fractions: list[float] = field(default_factory=_group_fractions)
    """Query-group counts to try, as fractions of the source's (each rounded down to a count
    that divides ``num_attention_heads`` and the tensor-parallel size)."""
    attention_no_op: bool = True
    """Try dropping the attention block."""
    attention_linear: bool = True
    """Try replacing the attention block by a least-squares linear layer."""
    mlp_no_op: bool = True
    """Try dropping the MLP block."""
    mlp_linear: bool = True
    """Try replacing the MLP block by a least-squares linear layer."""
    local_distill_steps: int = 0
    """Blockwise local distillation: train every narrower MLP block for this many full-batch
    Adam steps to reproduce the source block's output on the calibration tokens before it is
    scored (and the chosen ones again when pruned); 0: score the blocks as cut."""

    def __post_init__(self) -> None:
        if self.local_distill_steps < 0:
            raise ConfigError(f"search.blocks.local_distill_steps={self.local_distill_steps} "
                              f"must be >= 0")
        for name in ("ffn_hidden_size_fractions", "num_query_groups_fractions"):
            for x in getattr(self, name):
                if isinstance(x, bool) or not isinstance(x, int | float) or not 0 < x <= 1:
                    raise ConfigError(f"search.blocks.{name} holds {x!r}; each must be in "
                                      f"(0, 1]")


def sublayer_options(src: ModelConfig, lib: BlockLibrary, tp: int) -> dict[str, list[Option]]:
    """The blocks of each sublayer (the same for every layer), largest first."""
    a, g, f = src.num_attention_heads, src.query_groups, src.ffn_hidden_size
    ffn = sorted({int(x * f) // tp * tp for x in lib.ffn_hidden_size_fractions} - {0},
                 reverse=True)
    groups = sorted({max((n for n in range(1, int(x * g) + 1) if a % n == 0 and n % tp == 0),
                         default=0) for x in lib.num_query_groups_fractions} - {0}, reverse=True)
    extra = {sub: [(kind, None) for kind, on in (("linear", getattr(lib, f"{sub}_linear")),
                                                 ("no_op", getattr(lib, f"{sub}_no_op"))) if on]
             for sub in ("attention", "mlp")}
    return {"attention": [("full", n) for n in groups] + extra["attention"],
            "mlp": [("full", n) for n in ffn] + extra["mlp"]}


def layer_shape(attention: Option, mlp: Option) -> LayerShape:
    """The ``LayerShape`` of one attention and one MLP block."""
    return LayerShape(attention=attention[0], mlp=mlp[0],  # type: ignore[arg-type]
                      num_query_groups=attention[1], ffn_hidden_size=mlp[1])


def layer_cost(src: ModelConfig, shape: LayerShape) -> int:
    """Parameters of one layer of ``src`` with ``shape`` (``model.params``)."""
    one = dataclasses.replace(src, layer_shapes=[shape] * src.num_layers)
    return layer_params(one, layer=0)


@dataclass(kw_only=True)
class MemoryBudget:
    """The inference memory a heterogeneous search may spend (``search.budget: memory``):
    the weights plus the KV cache of ``batch_size`` sequences of ``context`` tokens (no
    activations, no framework overhead)."""

    target_gib: float | None = None
    """The budget in GiB (required with search.budget=memory)."""
    batch_size: int = 1
    """Sequences decoded at once."""
    context: int | None = None
    """Tokens per sequence held in the KV cache; None: the source's seq_length."""
    bytes_per_param: int = 2
    """Bytes per weight (2: bf16)."""
    kv_bytes: int = 2
    """Bytes per cached key or value element (2: bf16)."""

    def __post_init__(self) -> None:
        if self.target_gib is not None and not self.target_gib > 0:
            raise ConfigError(f"search.memory.target_gib={self.target_gib} must be > 0")
        for name in ("batch_size", "bytes_per_param", "kv_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"search.memory.{name}={getattr(self, name)} must be >= 1")
        if self.context is not None and self.context < 1:
            raise ConfigError(f"search.memory.context={self.context} must be >= 1")


def layer_memory(src: ModelConfig, shape: LayerShape, m: MemoryBudget) -> int:
    """Bytes of one layer of ``src`` with ``shape`` at inference: its weights and, for a full
    attention block, the keys and values of its query groups for every cached token."""
    kv = 0
    if shape.attention == "full":
        groups = shape.num_query_groups or src.query_groups
        kv = 2 * groups * src.head_dim * (m.context or src.seq_length) * m.batch_size
    return layer_cost(src, shape) * m.bytes_per_param + kv * m.kv_bytes


@dataclass
class LayerLibrary:
    """Every layer's candidates with their costs and scores (the solver's input)."""

    shapes: list[list[LayerShape]]
    """Per layer: the candidate shapes."""
    costs: list[list[int]]
    """Per layer: each candidate's parameters."""
    scores: list[list[float]]
    """Per layer: each candidate's score (attention block's + MLP block's)."""


def layer_library(src: ModelConfig, options: dict[str, list[Option]],
                  block_scores: dict[str, list[list[float]]],
                  cost: Callable[[ModelConfig, LayerShape], int] = layer_cost) -> LayerLibrary:
    """Per layer, every pair of an attention and an MLP block, with its ``cost`` (default
    parameters) and summed score (one-line error naming the first layer without one)."""
    lib = LayerLibrary([], [], [])
    for i in range(src.num_layers):
        for sub in ("attention", "mlp"):
            if not options[sub]:
                raise ConfigError(f"the block library of layer {i} is empty: no {sub} block "
                                  f"(search.blocks allows no width that divides the layout, "
                                  f"and neither linear nor no_op)")
        pairs = list(itertools.product(range(len(options["attention"])),
                                       range(len(options["mlp"]))))
        shapes = [layer_shape(options["attention"][x], options["mlp"][y]) for x, y in pairs]
        lib.shapes.append(shapes)
        lib.costs.append([cost(src, s) for s in shapes])
        lib.scores.append([block_scores["attention"][i][x] + block_scores["mlp"][i][y]
                           for x, y in pairs])
    return lib


def _is_parent(src: ModelConfig, sub: str, opt: Option) -> bool:
    size = src.query_groups if sub == "attention" else src.ffn_hidden_size
    return opt == ("full", size)


@contextlib.contextmanager
def replaced(model: torch.nn.Module, src: ModelConfig, importance: Any, layer: int, sub: str,
             opt: Option, linear: dict[str, dict[str, torch.Tensor]],
             trained: dict[Any, dict[str, torch.Tensor]] | None = None) -> Iterator[None]:
    """The parent ``model`` computing as if block ``(layer, sub)`` were ``opt`` while open.
    ``importance``: the ``Scores`` (which units a smaller block keeps); ``trained``: MLP
    blocks after local distillation by ``(layer, ffn_hidden_size)``, computed instead."""
    from nemo_minitron.model.build import unwrap
    from nemo_minitron.model.layouts import global_layers
    from nemo_minitron.prune.plan import Target, make_plan

    mod = global_layers(unwrap(model))[layer]
    kind = opt[0]
    # The units the pruning plan keeps for this block alone (one owner of the choice).
    shapes = [LayerShape() for _ in range(src.num_layers)]
    shapes[layer] = layer_shape(opt, ("full", None)) if sub == "attention" \
        else layer_shape(("full", None), opt)
    plan = make_plan(src, importance, Target(layer_shapes=shapes))
    mine = (trained or {}).get((layer, opt[1])) if sub == "mlp" else None
    if mine is not None:
        act, glu = mod.mlp.config.activation_func, mod.mlp.config.gated_linear_unit

        def distilled(_m, args, _out):
            return mlp_forward(args[0], mine, act, glu), None
        handle = mod.mlp.register_forward_hook(distilled)
    elif kind == "full" and sub == "mlp":
        mask = torch.zeros(src.ffn_hidden_size)
        mask[plan.kept_ffn[layer]] = 1.0

        def zero_neurons(_m, args):
            return (args[0] * mask.to(args[0]), *args[1:])
        handle = mod.mlp.linear_fc2.register_forward_pre_hook(zero_neurons)
    elif kind == "full":
        hosts = head_hosts(src, plan.kept_groups[layer], plan.kept_heads[layer])

        def regrouped(_m, args, kwargs):  # key/value [s, b, g, d] -> one per head [s, b, a, d]
            q, k, v, *rest = args
            idx = hosts.to(k.device)
            return (q, k.index_select(2, idx), v.index_select(2, idx), *rest), kwargs
        handle = mod.self_attention.core_attention.register_forward_pre_hook(
            regrouped, with_kwargs=True)
    else:
        fit = linear.get(linear_key(layer, sub))

        def replace(_m, args, kwargs, out):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            y = out[0] if isinstance(out, tuple) else out
            if kind == "no_op":
                return torch.zeros_like(y), None
            return torch.nn.functional.linear(x, fit["weight"], fit.get("bias")), None
        handle = (mod.self_attention if sub == "attention" else mod.mlp).register_forward_hook(
            replace, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _kl(parent: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Summed over tokens: KL(parent || candidate) of ``[b, s, V]`` logits (float64)."""
    p = torch.log_softmax(parent.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return (p.exp() * (p - q)).sum()


def kept_neurons(src: ModelConfig, importance: Any, layer: int, width: int) -> torch.Tensor:
    """The neurons an MLP block of ``width`` keeps in ``layer`` (the pruning plan's choice)."""
    from nemo_minitron.prune.plan import Target, make_plan

    shapes = [LayerShape() for _ in range(src.num_layers)]
    shapes[layer] = LayerShape(ffn_hidden_size=width)
    return make_plan(src, importance, Target(layer_shapes=shapes)).kept_ffn[layer]


def score_blocks(model: torch.nn.Module, src: ModelConfig, importance: Any,
                 options: dict[str, list[Option]], tokens: torch.Tensor, micro_batch_size: int,
                 linear: dict[str, dict[str, torch.Tensor]],
                 trained: dict[Any, dict[str, torch.Tensor]] | None = None
                 ) -> dict[str, list[list[float]]]:
    """``{sublayer: [layer][option] -> mean KL per token}`` of every block of ``options`` on
    the parent ``model`` (one process), over ``tokens [b, s]``; the parent's own block
    scores 0 without a pass. ``trained``: see ``replaced``."""
    from nemo_minitron.model.forward import forward_logits

    out: dict[str, list[list[float]]] = {
        sub: [[0.0] * len(options[sub]) for _ in range(src.num_layers)] for sub in options}
    for chunk in tokens.split(micro_batch_size):
        parent = forward_logits(model, chunk)
        n = parent.shape[0] * parent.shape[1]
        for sub, opts in options.items():
            for layer, (j, opt) in itertools.product(range(src.num_layers), enumerate(opts)):
                if _is_parent(src, sub, opt):
                    continue
                with replaced(model, src, importance, layer, sub, opt, linear, trained):
                    kl = _kl(parent, forward_logits(model, chunk))
                out[sub][layer][j] += float(kl) / (n * len(tokens) / len(chunk))
    return out

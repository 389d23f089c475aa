"""Per-layer (heterogeneous) pruning: the rules a ``Target.layer_shapes`` adds to uniform
pruning. Pure tensor logic plus one calibration pass (the linear replacements' fit).

Query groups. megatron-core keeps ``num_attention_heads`` in every layer, so a layer cut from
``g`` to ``g'`` query groups keeps all its heads and has ``a / g'`` heads per group. The kept
groups (the best ``g'`` by ``Scores.groups``) keep their key and value and their own heads,
in order; the heads of the removed groups (in head order) are re-attached to the kept groups,
filling each kept group's free slots in group order (``regroup``). A head's q rows and its
``linear_proj`` columns move together, so a removed group whose heads carry nothing (their
``linear_proj`` columns zero) leaves the logits exactly unchanged. A re-attached head that does
carry something now attends with its host group's key and value, not its own: its output
changes by however far the host's keys and values are from its own (the block's score, and
the short KD after the search, pay for it). Puzzle initialises such a block by mean-pooling
the merged groups' K/V instead; that changes the kept heads too, so the inert case would no
longer be exact and a kept group would lose the k/v its own heads were trained on.

No-op and linear blocks. A no-op block drops the sublayer (and its norm): the residual stream
passes through. A linear block is megatron-core's linear replacement, one ``hidden x hidden``
linear (bias when ``add_bias_linear``) after the sublayer's norm, fitted by least squares on
calibration activations of the source (input: the norm's output, target: the sublayer's output
with its bias, ``fit_linear_blocks``); the plan carries the fitted weights
(``PrunePlan.linear``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from nemo_minitron.config import ConfigError, ModelConfig, check_divisible
from nemo_minitron.config.hetero import LayerShape
from nemo_minitron.model.layouts import group_heads, heads_per_group

SUBLAYERS = ("attention", "mlp")
"""The two blocks of a layer, by ``LayerShape`` field."""


def linear_key(layer: int, sublayer: str) -> str:
    """The key of a linear replacement's fitted weights in ``PrunePlan.linear``."""
    return f"{layer}.{sublayer}"


def block_of(name: str) -> str | None:
    """The block (``SUBLAYERS``) a layer-local weight name belongs to, None for neither."""
    if name.startswith(("input_layernorm.", "self_attention.")):
        return "attention"
    if name.startswith(("pre_mlp_layernorm.", "mlp.")):
        return "mlp"
    return None


def linear_weights(fitted: dict[str, dict[str, torch.Tensor]], layer: int, sub: str
                   ) -> dict[str, torch.Tensor]:
    """The layer-local tensors of the linear replacement of block ``sub`` of source layer
    ``layer`` (megatron-core's: the block module is the linear, ``self_attention.weight``)."""
    fit = fitted.get(linear_key(layer, sub))
    if fit is None:
        raise ConfigError(f"the plan has no fitted weights for the linear {sub} block of layer "
                          f"{layer} (prune.hetero.fit_linear_blocks)")
    prefix = "self_attention." if sub == "attention" else "mlp."
    return {prefix + k: v for k, v in fit.items()}


def hetero_build(model: torch.nn.Module, cfg: ModelConfig, config: Any,
                 build: Any) -> tuple[Any, Any]:
    """``(HeterogeneousTransformerConfig, build)`` of the pruned model: the user's
    ``config`` (``TransformerConfig``) with ``cfg``'s layer shapes, and unless the user
    passes ``build``, ``type(model)`` built with megatron-core's heterogeneous layer spec
    (``model.build.layer_spec``, the same core attention as ``model``'s)."""
    import dataclasses as dc

    from megatron.core.transformer.heterogeneous.heterogeneous_config import (
        HeterogeneousTransformerConfig,
    )

    from nemo_minitron.config.hetero import hetero_fields
    from nemo_minitron.model.attention import SDPAttention
    from nemo_minitron.model.build import layer_spec
    from nemo_minitron.model.rebuild import gpt_arguments

    fields = {f.name: getattr(config, f.name) for f in dc.fields(config) if f.init}
    hconfig = HeterogeneousTransformerConfig(**{**fields, **hetero_fields(cfg)})
    if build is not None:
        return hconfig, build
    first = model.decoder.layers[0] if len(model.decoder.layers) else None
    core = getattr(getattr(first, "self_attention", None), "core_attention", None)
    if core is not None and "transformer_engine" in type(core).__module__:
        raise ConfigError("a heterogeneous plan builds megatron-core's heterogeneous layer "
                          "spec with local modules; this model uses Transformer Engine's "
                          "(pass build=)")
    spec = layer_spec(cfg, use_te=False, config=hconfig,
                      attention="sdpa" if core is None or isinstance(core, SDPAttention)
                      else "local")
    args = {**gpt_arguments(model), "transformer_layer_spec": spec}
    return hconfig, lambda c: type(model)(config=c, **args)


def fill_layers(old: torch.nn.Module, new: torch.nn.Module, fn: Any, cfg: ModelConfig) -> None:
    """Fill every layer of ``new`` from ``fn(full tensors of the same layer of old, layer)``
    (``model.stream.LayerFn``): no layer changes stage, so each rank fills its own layers
    from one full (TP-gathered) layer at a time, re-split evenly over TP (``full_state``)."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.model.full_state import gather_tp, tp_slice
    from nemo_minitron.model.layouts import global_layers, layer_key

    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    olds, news = global_layers(old), global_layers(new)
    if sorted(olds) != sorted(news):
        raise AssertionError(f"layers {sorted(news)} of the new stage, {sorted(olds)} of the old")
    gated = old.config.gated_linear_unit
    for j, layer in sorted(news.items()):
        full = {n: gather_tp(p, n, gated) for n, p in sorted(olds[j].named_parameters())}
        pruned = fn(full, j)
        params = dict(layer.named_parameters())
        if set(pruned) != set(params):
            raise AssertionError(f"layer {j}: pruned tensors {sorted(pruned)}, the model has "
                                 f"{sorted(params)}")
        for name, param in params.items():
            value = tp_slice(pruned[name], param, name, cfg, rank, size)
            if tuple(value.shape) != tuple(param.shape):
                raise ConfigError(f"{layer_key(j, name)} has shape {list(value.shape)}, the "
                                  f"new model needs {list(param.shape)}")
            with torch.no_grad():
                param.copy_(value)


def check_layer_target(src: ModelConfig, shapes: list[LayerShape], tp: int) -> None:
    """One-line errors naming the layer for per-layer shapes the source cannot be pruned to
    under tensor parallelism ``tp``."""
    if src.is_heterogeneous:
        raise ConfigError("target.layer_shapes: the source is already heterogeneous (prune a "
                          "uniform model)")
    if len(shapes) != src.num_layers:
        raise ConfigError(f"target.layer_shapes has {len(shapes)} entries; the source has "
                          f"{src.num_layers} layers")
    a, g, f = src.num_attention_heads, src.query_groups, src.ffn_hidden_size
    for i, s in enumerate(shapes):
        name = f"target.layer_shapes[{i}]."
        if s.num_query_groups is not None:
            if s.num_query_groups > g:
                raise ConfigError(f"{name}num_query_groups={s.num_query_groups} is larger than "
                                  f"the source's {g}")
            if a % s.num_query_groups:
                raise ConfigError(f"{name}num_query_groups={s.num_query_groups} does not divide "
                                  f"model.num_attention_heads={a}")
        if s.ffn_hidden_size is not None and s.ffn_hidden_size > f:
            raise ConfigError(f"{name}ffn_hidden_size={s.ffn_hidden_size} is larger than the "
                              f"source's {f}")
        check_divisible({"num_query_groups": s.num_query_groups,
                         "ffn_hidden_size": s.ffn_hidden_size}, tp, 1, name)


def regroup(src: ModelConfig, kept_groups: list[int]) -> torch.Tensor:
    """``[g', a / g']`` global head ids of the pruned layer's groups: each kept group's own
    heads, then the removed groups' heads filling the free slots in order (module docstring).
    """
    a, new_g = src.num_attention_heads, len(kept_groups)
    per_new = a // new_g
    kept = set(kept_groups)
    spare = [h for grp in range(src.query_groups) if grp not in kept
             for h in group_heads(src, grp).tolist()]
    rows = []
    for grp in kept_groups:
        own = group_heads(src, grp).tolist()
        take = per_new - len(own)
        rows.append(own + spare[:take])
        spare = spare[take:]
    return torch.tensor(rows)


def head_hosts(src: ModelConfig, kept_groups: torch.Tensor, kept_heads: torch.Tensor
               ) -> torch.Tensor:
    """``[a]``: the source query group whose key and value each head of the source attends
    with in the pruned layer (``kept_heads [g', a / g']``: the plan's, row j in kept group j)."""
    host = torch.arange(src.num_attention_heads) // heads_per_group(src)
    for grp, heads in zip(kept_groups.tolist(), kept_heads.tolist()):
        host[heads] = grp
    return host


def linear_blocks(cfg: ModelConfig) -> list[tuple[int, str]]:
    """``(layer, sublayer)`` of every linear block of ``cfg``."""
    return [(i, sub) for i in range(cfg.num_layers if cfg.is_heterogeneous else 0)
            for sub in SUBLAYERS if getattr(cfg.layer_shape(i), sub) == "linear"]


def fit_linear_blocks(model: torch.nn.Module, tokens: torch.Tensor, micro_batch_size: int,
                      blocks: Iterable[tuple[int, str]], bias: bool
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """Least-squares linear replacements of the ``(layer, sublayer)`` blocks of ``model``,
    fitted on ``tokens [b, s]``: input the sublayer's input (its norm's output), target its
    output plus bias. Under TP both are whole on every rank (no sequence parallelism), so every
    rank fits the same weights; under PP each stage fits its own layers. Returns
    ``linear_key -> {"weight" [h, h], ("bias" [h])}`` (megatron's ``y = x W^T + b``). The
    normal equations are summed in float64 and solved by ``torch.linalg.lstsq`` (gelsd: the
    least-norm solution when the calibration tokens do not span the hidden space)."""
    from nemo_minitron.model.build import unwrap
    from nemo_minitron.model.forward import forward_pass
    from nemo_minitron.model.layouts import global_layers

    wanted = sorted(set(blocks))
    if not wanted:
        return {}
    layers = global_layers(unwrap(model))
    gram: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(key: str):
        def fn(_mod, args, kwargs, out):
            x = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()
            y, b = out if isinstance(out, tuple) else (out, None)
            y = y if b is None else y + b
            x = x.reshape(-1, x.shape[-1]).double()
            if bias:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            y = y.detach().reshape(-1, y.shape[-1]).double()
            if key not in gram:
                gram[key] = [x.new_zeros(x.shape[1], x.shape[1]), x.new_zeros(x.shape[1],
                                                                              y.shape[1])]
            gram[key][0] += x.T @ x
            gram[key][1] += x.T @ y
        return fn

    for layer, sub in wanted:
        if layer not in layers:  # another pipeline stage's: fitted there
            continue
        module = layers[layer].self_attention if sub == "attention" else layers[layer].mlp
        handles.append(module.register_forward_hook(hook(linear_key(layer, sub)),
                                                    with_kwargs=True))
    try:
        forward_pass(model, tokens, micro_batch_size=micro_batch_size)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, (xtx, xty) in gram.items():
        w = torch.linalg.lstsq(xtx, xty, driver="gelsd").solution  # [h (+1), h]
        dtype = next(model.parameters()).dtype
        out[key] = {"weight": w.T.contiguous().to(dtype)} if not bias else \
            {"weight": w[:-1].T.contiguous().to(dtype), "bias": w[-1].contiguous().to(dtype)}
    return out


def mlp_forward(x: torch.Tensor, w: dict[str, torch.Tensor], act: Any, gated: bool
                ) -> torch.Tensor:
    """A dense MLP block's output (bias included) from its full layer-local tensors ``w``."""
    import torch.nn.functional as F

    h = F.linear(x, w["mlp.linear_fc1.weight"], w.get("mlp.linear_fc1.bias"))
    if gated:
        gate, up = h.chunk(2, dim=-1)
        h = act(gate) * up
    else:
        h = act(h)
    return F.linear(h, w["mlp.linear_fc2.weight"], w.get("mlp.linear_fc2.bias"))


def distill_mlp_blocks(model: torch.nn.Module, cfg: ModelConfig, tokens: torch.Tensor,
                       micro_batch_size: int, kept: dict[Any, tuple[int, torch.Tensor]],
                       steps: int, lr: float = 1e-2) -> dict[Any, dict[str, torch.Tensor]]:
    """Blockwise local distillation (Puzzle): for each ``key -> (layer, kept neurons)``, the
    MLP of that layer cut to those neurons, then trained for ``steps`` full-batch Adam steps
    to reproduce the source MLP's output (bias included) from its input (the norm's output)
    on ``tokens``; the step size is ``lr`` times the RMS of the block's weights (Adam moves
    every weight by about its step size, whatever the scale of the model), and the weights of
    the lowest loss seen are kept (the cut ones included: never worse on these tokens).
    Returns ``key -> full layer-local MLP tensors`` (this stage's layers only; under TP every
    rank trains on the same whole tensors, so every rank gets the same)."""
    from nemo_minitron.model.build import unwrap
    from nemo_minitron.model.forward import forward_pass
    from nemo_minitron.model.full_state import gather_tp
    from nemo_minitron.model.layouts import fc1_rows, gated, global_layers

    layers = global_layers(unwrap(model))
    wanted = sorted({layer for layer, _ in kept.values() if layer in layers})
    io: dict[int, list[list[torch.Tensor]]] = {i: [[], []] for i in wanted}

    def grab(i: int):
        def fn(_mod, args, _kwargs, out):
            y, b = out if isinstance(out, tuple) else (out, None)
            # Copies: the layer adds the residual into the output in place afterwards.
            io[i][0].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
            io[i][1].append((y if b is None else y + b).detach().reshape(-1, y.shape[-1])
                            .clone())
        return fn
    handles = [layers[i].mlp.register_forward_hook(grab(i), with_kwargs=True) for i in wanted]
    try:
        forward_pass(model, tokens, micro_batch_size=micro_batch_size)
    finally:
        for h in handles:
            h.remove()
    act, glu = model.config.activation_func, gated(cfg)
    out = {}
    for key, (i, neurons) in kept.items():
        if i not in layers:
            continue
        full = {"mlp." + n: gather_tp(p, "mlp." + n, glu)
                for n, p in layers[i].mlp.named_parameters()}
        rows = fc1_rows(cfg, neurons)
        w = {n: (t[rows] if "fc1" in n else t[:, neurons] if n.endswith("fc2.weight") else t)
             .detach().clone().requires_grad_(True) for n, t in full.items()}
        x, y = torch.cat(io[i][0]), torch.cat(io[i][1])
        scale = float(torch.cat([t.detach().flatten() for n, t in w.items()
                                 if n.endswith("weight")]).pow(2).mean().sqrt())
        opt = torch.optim.Adam(list(w.values()), lr=lr * scale)
        best, best_loss = {n: t.detach().clone() for n, t in w.items()}, float("inf")
        with torch.enable_grad():
            for step in range(steps + 1):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(mlp_forward(x, w, act, glu), y)
                if loss.item() < best_loss:
                    best_loss, best = loss.item(), {n: t.detach().clone() for n, t in w.items()}
                if step == steps:
                    break
                loss.backward()
                opt.step()
        out[key] = best
    return out

"""Hugging Face mixture-of-experts models <-> ``ModelConfig`` and Megatron tensors.

``MixtralForCausalLM``: softmax over the experts, top-k, renormalised (Megatron's default
router: top-k logits, softmax over them, the same weights); experts stored per expert as
``block_sparse_moe.experts.E.w1`` (gate), ``w3`` (up), ``w2`` (down). ``Qwen2MoeForCausalLM``:
softmax then top-k, renormalised only with ``norm_topk_prob`` (else Megatron's
``moe_router_pre_softmax``), a shared expert scaled by a sigmoid gate, QKV bias; experts as
``mlp.experts.E.gate_proj``/``up_proj``/``down_proj``. ``Qwen3MoeForCausalLM``: Qwen2-MoE's
experts and router without the shared expert and the QKV bias, with a norm of each query and
key head (``model.qk_layernorm``). transformers 5 fuses the experts in memory
(``experts.gate_up_proj`` [E, 2F, H]) and by default writes these per-expert names on disk,
which export writes too. Import also reads the fused tensors transformers 5 writes with
``save_pretrained(save_original_format=False)`` (``fused_expert_parts``): each per-expert name
is then a slice of one stored tensor, read alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.model.layouts import fc1_views, join_fc1, split_expert

MOE_ARCHS = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
"""The Hugging Face MoE architectures read and written."""

_SHARED = "mlp.shared_experts."


def moe_fields_from_hf(arch: str, hf: dict[str, Any]) -> dict[str, Any]:
    """The MoE ``ModelConfig`` fields (and ``ffn_hidden_size``) of an HF MoE ``config.json``."""
    def positive(key: str) -> int:
        v = hf.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"config.json field {key!r} is missing or not a positive integer "
                              f"(got {v!r})")
        return v

    topk = positive("num_experts_per_tok")
    if arch == "MixtralForCausalLM":
        return dict(num_moe_experts=positive("num_local_experts"), moe_router_topk=topk,
                    moe_ffn_hidden_size=positive("intermediate_size"))
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ConfigError("config.json mlp_only_layers/decoder_sparse_step: dense layers among "
                          "the MoE layers are not supported (every layer an MoE layer)")
    # transformers 5.25 writes Qwen3-MoE's expert count as num_local_experts.
    experts = "num_experts" if "num_experts" in hf else "num_local_experts"
    fields = dict(num_moe_experts=positive(experts), moe_router_topk=topk,
                  moe_ffn_hidden_size=positive("moe_intermediate_size"),
                  moe_router_pre_softmax=not hf.get("norm_topk_prob", False))
    if arch == "Qwen3MoeForCausalLM":
        return {**fields, "qk_layernorm": True}
    return {**fields, "moe_shared_expert_gate": True,
            "moe_shared_expert_intermediate_size": positive("shared_expert_intermediate_size")}


def hf_moe_arch(cfg: ModelConfig) -> tuple[str, str]:
    """``(architecture, model_type)`` that holds the MoE model ``cfg``; one-line error when
    neither does."""
    if cfg.moe_shared_expert_intermediate_size:
        if not cfg.moe_shared_expert_gate or cfg.qk_layernorm:
            raise ConfigError("an MoE model with a shared expert exports as Qwen2-MoE, which "
                              "gates it (model.moe_shared_expert_gate) and has no "
                              "model.qk_layernorm")
        return "Qwen2MoeForCausalLM", "qwen2_moe"
    if cfg.qk_layernorm:
        if cfg.add_qkv_bias:
            raise ConfigError("model.add_qkv_bias with model.qk_layernorm cannot be exported "
                              "(Qwen3-MoE has no QKV bias)")
        return "Qwen3MoeForCausalLM", "qwen3_moe"
    if cfg.moe_router_pre_softmax or cfg.add_qkv_bias:
        raise ConfigError("an MoE model without a shared expert and query/key norms exports "
                          "as Mixtral, which has no model.moe_router_pre_softmax and no "
                          "model.add_qkv_bias")
    return "MixtralForCausalLM", "mixtral"


def hf_moe_config(cfg: ModelConfig) -> dict[str, Any]:
    """The MoE fields of the HF ``config.json`` of ``cfg``."""
    arch, _ = hf_moe_arch(cfg)
    common = {"num_experts_per_tok": cfg.moe_router_topk, "output_router_logits": False,
              "router_aux_loss_coef": cfg.moe_aux_loss_coeff, "sliding_window": None}
    if arch == "MixtralForCausalLM":
        return {**common, "num_local_experts": cfg.num_moe_experts,
                "intermediate_size": cfg.expert_ffn_hidden_size, "router_jitter_noise": 0.0}
    qwen = {**common, "num_experts": cfg.num_moe_experts,
            "moe_intermediate_size": cfg.expert_ffn_hidden_size,
            "norm_topk_prob": not cfg.moe_router_pre_softmax, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "use_sliding_window": False}
    if arch == "Qwen3MoeForCausalLM":
        return {**qwen, "attention_bias": False}
    return {**qwen, "qkv_bias": cfg.add_qkv_bias,
            "shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size}


def _names(cfg: ModelConfig, p: str) -> tuple[str, Callable[[int], tuple[str, str, str]]]:
    """(HF router name, expert e -> HF (gate, up, down) names) of layer prefix ``p``."""
    if hf_moe_arch(cfg)[0] == "MixtralForCausalLM":
        q = p + "block_sparse_moe."
        return q + "gate.weight", lambda e: tuple(  # type: ignore[return-value]
            f"{q}experts.{e}.{w}.weight" for w in ("w1", "w3", "w2"))
    q = p + "mlp."
    return q + "gate.weight", lambda e: tuple(  # type: ignore[return-value]
        f"{q}experts.{e}.{w}_proj.weight" for w in ("gate", "up", "down"))


def fused_expert_parts(cfg: ModelConfig, stored: Any
                       ) -> dict[str, tuple[str, tuple[int | slice, ...] | None]]:
    """Per-expert HF name -> ``(stored name, index into it)`` for the layers whose experts
    ``stored`` (names in the checkpoint) holds fused, as transformers 5 writes them with
    ``save_original_format=False``: ``mlp.experts.gate_up_proj [E, 2F, H]`` (each expert's gate
    rows, then its up rows) and ``mlp.experts.down_proj [E, H, F]``; Mixtral's router is then
    ``mlp.gate`` (``block_sparse_moe.gate`` on the original names). Index None: all of it."""
    f = cfg.expert_ffn_hidden_size
    parts: dict[str, tuple[str, tuple[int | slice, ...] | None]] = {}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        gate_up, down = p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"
        if gate_up not in stored and down not in stored:
            continue
        router, expert = _names(cfg, p)
        for e in range(cfg.num_moe_experts or 0):
            gate, up, out = expert(e)
            parts |= {gate: (gate_up, (e, slice(0, f))), up: (gate_up, (e, slice(f, 2 * f))),
                      out: (down, (e,))}
        if router not in stored and p + "mlp.gate.weight" in stored:
            parts[router] = (p + "mlp.gate.weight", None)
    return parts


def fused_expert_shapes(cfg: ModelConfig, parts: dict[str, tuple[str, Any]]
                        ) -> dict[str, tuple[int, ...]]:
    """The shapes the stored tensors of ``parts`` (``fused_expert_parts``) must have."""
    h, f, e = cfg.hidden_size, cfg.expert_ffn_hidden_size, cfg.num_moe_experts or 0
    want = {}
    for stored, _ in parts.values():
        want[stored] = (e, 2 * f, h) if stored.endswith("gate_up_proj") else \
            (e, h, f) if stored.endswith("down_proj") else (e, h)
    return want


def _shared(p: str) -> tuple[str, str, str, str]:
    q = p + "mlp.shared_expert"
    return (f"{q}.gate_proj.weight", f"{q}.up_proj.weight", f"{q}.down_proj.weight",
            f"{q}_gate.weight")


def expected_moe_shapes(cfg: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """The HF MoE tensors of layer prefix ``p`` with their shapes."""
    h, f, e = cfg.hidden_size, cfg.expert_ffn_hidden_size, cfg.num_moe_experts or 0
    router, expert = _names(cfg, p)
    shapes: dict[str, tuple[int, ...]] = {router: (e, h)}
    for i in range(e):
        gate, up, down = expert(i)
        shapes.update({gate: (f, h), up: (f, h), down: (h, f)})
    s = cfg.moe_shared_expert_intermediate_size
    if s:
        gate, up, down, sgate = _shared(p)
        shapes.update({gate: (s, h), up: (s, h), down: (h, s), sgate: (1, h)})
    return shapes


def _hf_parts(name: str, p: str, cfg: ModelConfig) -> list[str] | None:
    """The HF tensor names the Megatron MoE tensor ``name`` (layer-local) of layer prefix ``p``
    is made of, in order (a SwiGLU fc1: gate, up); None when ``name`` is not an MoE tensor."""
    router, expert = _names(cfg, p)
    if name == "mlp.router.weight":
        return [router]
    routed = split_expert(name)
    if routed is not None:
        gate, up, down = expert(routed[0])
        rest = routed[1]
    elif name.startswith(_SHARED):
        rest = name[len(_SHARED):]
        gate, up, down, sgate = _shared(p)
        if rest == "gate_weight":
            return [sgate]
    else:
        return None
    if rest == "linear_fc1.weight":
        return [gate, up]
    return [down] if rest == "linear_fc2.weight" else None


def megatron_moe_tensor(name: str, p: str, cfg: ModelConfig,
                        get: Callable[[str], torch.Tensor]) -> torch.Tensor | None:
    """The Megatron MoE tensor ``name`` (layer-local) of layer prefix ``p`` from HF tensors;
    None when ``name`` is not an MoE tensor."""
    parts = _hf_parts(name, p, cfg)
    if parts is None:
        return None
    return join_fc1(*map(get, parts)) if len(parts) == 2 else get(parts[0])


def hf_moe_views(name: str, p: str, w: torch.Tensor, cfg: ModelConfig
                 ) -> list[tuple[str, torch.Tensor]] | None:
    """The HF tensors the full Megatron MoE tensor ``name`` of layer prefix ``p`` holds, as
    views of ``w``; None when ``name`` is not an MoE tensor."""
    parts = _hf_parts(name, p, cfg)
    if parts is None:
        return None
    return list(zip(parts, fc1_views(w))) if len(parts) == 2 else [(parts[0], w)]

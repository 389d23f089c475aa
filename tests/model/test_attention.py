"""SDPA core attention (``build_model(attention="sdpa")``) against Megatron's local
``DotProductAttention`` on the same weights: logits and gradients of a causal batch and of a
packed block-diagonal batch, KV-cache greedy generation, and a multi-token decode step over a
KV cache against a from-scratch forward of the whole sequence; at TP=1 and TP=2. The
self-attention that caches RoPE'd keys decodes exactly as Megatron's own ``SelfAttention``, and
the local spec's ``SwiGLUMLP`` trains as Megatron's own ``MLP``; logits returned without
autograd, computed batch-first (``MinitronGPTModel``), equal Megatron's ``GPTModel``'s, and
so do the sequence-first logits a ``logits_loss`` is given; decode steps on one rank, run without
the CPU backend's device mode, equal Megatron's bit for bit."""

from __future__ import annotations

import pytest
import torch

from tests.dist import spawn

CFG = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
           num_query_groups=2, seq_length=32, vocab_size=256)
TOL = dict(atol=1e-5, rtol=1e-5)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _positions(b: int, s: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + s).unsqueeze(0).expand(b, s)


def _segments(b: int, s: int) -> torch.Tensor:
    """Packed windows: each row cut into segments at random boundaries."""
    starts = torch.rand(b, s, generator=_gen(3)) < 0.2
    starts[:, 0] = True
    return starts.long().cumsum(1)


def _fwd_bwd(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None):
    """Vocab-parallel logits of ``tokens`` and parameter gradients of the mean LM loss."""
    b, s = tokens.shape
    model.zero_grad(set_to_none=True)
    labels = tokens.roll(-1, 1)
    loss = model(tokens, _positions(b, s), mask, labels=labels).float().mean()
    loss.backward()
    with torch.no_grad():
        logits = model(tokens, _positions(b, s), mask)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits, grads


def _assert_same(a, b, what: str, exact: bool = False) -> None:
    la, ga = a
    lb, gb = b
    tol = dict(atol=0.0, rtol=0.0) if exact else TOL
    torch.testing.assert_close(la, lb, **tol, msg=lambda m: f"{what} logits: {m}")
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], **tol, msg=lambda m, n=n: f"{what} {n}: {m}")


@torch.no_grad()
def _decode_step(model: torch.nn.Module, tokens: torch.Tensor, prefix: int,
                 explicit_mask: bool) -> torch.Tensor:
    """Prefill ``tokens[:, :prefix]`` into a KV cache, then feed the rest in one forward
    (q_len < k_len); full-vocabulary logits of the fed positions."""
    from megatron.core.inference.contexts import StaticInferenceContext

    b, s = tokens.shape
    model.eval()  # as generation runs it (training mode asks for Transformer Engine here)
    ctx = StaticInferenceContext(b, s)
    model(tokens[:, :prefix], _positions(b, prefix), None, inference_context=ctx,
          runtime_gather_output=True)
    ctx.sequence_len_offset = prefix
    ctx.materialize_only_last_token_logits = False
    n = s - prefix
    # Megatron convention, True = masked: query i (position prefix+i) sees keys <= prefix+i.
    mask = (torch.ones(n, s, dtype=torch.bool).triu(prefix + 1)[None, None]
            if explicit_mask else None)
    out = model(tokens[:, prefix:], _positions(b, n, prefix), mask, inference_context=ctx,
                runtime_gather_output=True).float()
    model.train()
    return out


def _with_megatron_modules(cfg) -> torch.nn.Module:
    """``build_model(cfg)`` with Megatron's stock ``GPTModel``, and its ``SelfAttention``,
    ``MLP`` and linear layers in the spec."""
    from megatron.core.models.gpt import GPTModel

    from nemo_minitron.model import build, gpt

    spec, ours = build.layer_spec, gpt.MinitronGPTModel
    build.layer_spec = lambda *a, **k: _stock(spec(*a, **k))
    gpt.MinitronGPTModel = GPTModel
    try:
        return build.build_model(cfg)
    finally:
        build.layer_spec, gpt.MinitronGPTModel = spec, ours


def _logits_fwd_bwd(model: torch.nn.Module, tokens: torch.Tensor):
    """Returned logits (no labels) and the gradients of their squares."""
    b, s = tokens.shape
    model.zero_grad(set_to_none=True)
    logits = model(tokens, _positions(b, s), None)
    assert logits.shape[:2] == (b, s) and logits.is_contiguous()
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _stock(spec):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP

    attn, mlp = spec.submodules.self_attention, spec.submodules.mlp
    attn.module, mlp.module = SelfAttention, MLP
    column, row = ColumnParallelLinear, RowParallelLinear
    attn.submodules.linear_qkv, attn.submodules.linear_proj = column, row
    mlp.submodules.linear_fc1, mlp.submodules.linear_fc2 = column, row
    return spec


def attention_job(tp: int) -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.mlp import MLP

    from nemo_minitron.config import ConfigError, ModelConfig, ParallelConfig
    from nemo_minitron.data.instruct import sft_attention_mask
    from nemo_minitron.eval.generate import SamplingConfig, generate
    from nemo_minitron.model.attention import RopeCachedSelfAttention, SDPAttention
    from nemo_minitron.model.build import build_model, transformer_config
    from nemo_minitron.model.mlp import SwiGLUMLP
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp), seed=7)
    cfg = ModelConfig(**CFG)
    local = build_model(cfg, attention="local")
    sdpa = build_model(cfg, attention="sdpa")
    core = [layer.self_attention.core_attention for layer in sdpa.decoder.layers]
    assert all(type(c) is SDPAttention for c in core)
    assert type(local.decoder.layers[0].self_attention.core_attention) is DotProductAttention
    # Same checkpoint: identical (sharded) state-dict keys and shapes.
    ref = local.state_dict()

    def shapes(sd: dict) -> dict:
        return {k: getattr(v, "shape", None) for k, v in sd.items()}  # _extra_state: None

    assert shapes(sdpa.state_dict()) == shapes(ref)
    assert sdpa.sharded_state_dict().keys() == local.sharded_state_dict().keys()
    sdpa.load_state_dict(ref, strict=True)

    b, s = 4, CFG["seq_length"]
    tokens = torch.randint(0, CFG["vocab_size"], (b, s), generator=_gen(0))
    _assert_same(_fwd_bwd(sdpa, tokens, None), _fwd_bwd(local, tokens, None), "causal")
    packed = sft_attention_mask(_segments(b, s))
    assert packed.sum() > torch.ones(s, s).triu(1).sum() * b  # block-diagonal, not just causal
    _assert_same(_fwd_bwd(sdpa, tokens, packed), _fwd_bwd(local, tokens, packed), "packed")

    prompts = [tokens[0, :5].tolist(), tokens[1, :9].tolist(), tokens[2, :1].tolist()]
    greedy = SamplingConfig(max_new_tokens=12)
    ref_ids = generate(local, prompts, greedy)
    assert generate(sdpa, prompts, greedy) == ref_ids
    assert generate(sdpa, prompts, greedy, use_cache=False) == ref_ids

    seq = tokens[:2, :24]
    with torch.no_grad():
        scratch = local(seq, _positions(2, 24), None, runtime_gather_output=True).float()
    for explicit in (False, True):
        got = _decode_step(sdpa, seq, 16, explicit)
        torch.testing.assert_close(got, scratch[:, 16:], **TOL)
    torch.testing.assert_close(_decode_step(local, seq, 16, True), scratch[:, 16:], **TOL)

    # Keys cached with RoPE applied (RopeCachedSelfAttention) give bit-identical decode logits
    # to Megatron's SelfAttention, which caches raw keys and applies RoPE to the whole cache;
    # SwiGLUMLP and the attention's RoPE train as Megatron's (same logits and gradients).
    stock = _with_megatron_modules(cfg)
    stock.load_state_dict(ref, strict=True)
    assert type(sdpa.decoder.layers[0].self_attention) is RopeCachedSelfAttention
    assert type(sdpa.decoder.layers[0].mlp) is SwiGLUMLP
    assert type(stock.decoder.layers[0].mlp) is MLP
    first = sdpa.decoder.layers[0]
    linears = (first.self_attention.linear_qkv, first.mlp.linear_fc2)
    assert [type(m).__name__ for m in linears] == ["InferenceColumnParallelLinear",
                                                   "InferenceRowParallelLinear"]
    assert type(stock.decoder.layers[0].mlp.linear_fc2).__name__ == "RowParallelLinear"
    assert sdpa.decoder.layers[0].mlp.tp_group is stock.decoder.layers[0].mlp.tp_group
    # A loss handed the logits (logits_loss) gets them sequence-first and contiguous, as the
    # output layer wrote them: the same values and gradients as Megatron's returned logits.
    # Afterwards labels give Megatron's cross-entropy again (the _fwd_bwd comparison below).
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def square(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        seen.append((labels, logits))
        return logits.float().pow(2).mean()

    sdpa.zero_grad(set_to_none=True)
    labels = tokens.roll(-1, 1)
    sdpa(tokens, _positions(b, s), None, labels=labels, logits_loss=square).backward()
    (got_labels, got_logits), = seen
    assert got_logits.shape[:2] == (s, b) and got_logits.is_contiguous()
    assert torch.equal(got_labels, labels)
    _assert_same((got_logits.detach().transpose(0, 1),
                  {n: p.grad.clone() for n, p in sdpa.named_parameters()}),
                 _logits_fwd_bwd(stock, tokens), "logits_loss")
    # Bit-identical: RoPE without concatenations (model.rope), SwiGLU without the zero offset.
    _assert_same(_fwd_bwd(sdpa, tokens, None), _fwd_bwd(stock, tokens, None), "stock modules",
                 exact=True)
    # Logits returned without autograd are computed batch-first (MinitronGPTModel): equal to
    # Megatron's; under autograd both take Megatron's path (same logits and gradients).
    assert type(stock).__name__ == "GPTModel" and type(sdpa).__name__ == "MinitronGPTModel"
    with torch.no_grad():
        got, want = sdpa(tokens, _positions(b, s), None), stock(tokens, _positions(b, s), None)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, **TOL)
    _assert_same(_logits_fwd_bwd(sdpa, tokens), _logits_fwd_bwd(stock, tokens), "returned")
    # Decode steps on one rank run with the CPU backend's device mode paused (MinitronGPTModel),
    # the prefill that allocates the cache with it; the logits stay bit-identical.
    from torch.overrides import _get_current_function_mode

    modes: list[object] = []
    hook = sdpa.decoder.layers[0].register_forward_pre_hook(
        lambda *_: modes.append(_get_current_function_mode()))
    for prefix in (1, 8, 23):
        assert torch.equal(_decode_step(sdpa, seq, prefix, False),
                           _decode_step(stock, seq, prefix, False)), prefix
    hook.remove()
    prefill_mode = modes[0]
    assert prefill_mode is not None and modes[::2] == [prefill_mode] * 3
    assert modes[1::2] == ([None] * 3 if tp == 1 else [prefill_mode] * 3)

    dropout = transformer_config(cfg)
    dropout.attention_dropout = 0.1
    with pytest.raises(ConfigError, match="attention_dropout"):
        SDPAttention(dropout, 1, core[0].attn_mask_type, "self")


def test_sdpa_equals_local_tp1():
    spawn(attention_job, 1, 1)


@pytest.mark.dist
def test_sdpa_equals_local_tp2():
    spawn(attention_job, 2, 2)


def test_bottom_right_causal_matches_sliced_causal_mask():
    from nemo_minitron.model.attention import bottom_right_causal

    full = torch.ones(7, 7, dtype=torch.bool).tril()
    for sq in (1, 3, 7):
        assert torch.equal(bottom_right_causal(sq, 7, torch.device("cpu")), full[7 - sq:])


def test_unknown_attention_is_refused():
    from nemo_minitron.config import ConfigError
    from nemo_minitron.model.build import check_attention

    with pytest.raises(ConfigError, match="attention='flash'"):
        check_attention("flash")

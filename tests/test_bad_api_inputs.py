"""Bad input to the library API (``import nemo_minitron as nm``), table-driven: each call
raises one ``ConfigError`` of one line naming the argument and the rule, before anything is
changed. ``API_CASES``: (id, call, needles), calls that need no parallel state;
``PRUNE_CASES``: ``nm.prune`` of built models, run in child processes (``tests.dist``). The
command line's table is ``tests/test_bad_inputs.py``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def _tc(**changes):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    kw = dict(num_layers=2, hidden_size=64, num_attention_heads=4, normalization="RMSNorm",
              gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False)
    return TransformerConfig(**{**kw, **changes})


def _sd(**shapes):
    return {k: torch.zeros(*v) for k, v in {"decoder.final_layernorm.weight": (64,),
                                             **shapes}.items()}


def _nm():
    import nemo_minitron

    return nemo_minitron


def _moe_plan(target: dict, scores_of: dict | None = None, **layout):
    """``nm.make_plan`` of a tiny MoE model (4 experts, top-2) to ``target``, with random scores
    of ``scores_of`` (a dense model's config fields; None: the MoE model's own)."""
    from nemo_minitron.importance.baselines import random_scores

    nm = _nm()
    cfg = nm.ModelConfig(num_layers=2, hidden_size=64, num_moe_experts=4, moe_ffn_hidden_size=64)
    scores = random_scores(nm.ModelConfig(**scores_of) if scores_of else cfg, 0)
    return nm.make_plan(cfg, scores, nm.Target(hardware_multiple=1, **target), **layout)


def _search(**kw):
    from nemo_minitron.search.enumerate import SearchConfig

    return SearchConfig(**kw)


def _shapes(*shapes: dict) -> list:
    from nemo_minitron.config.hetero import LayerShape

    return [LayerShape(**s) for s in shapes]


def _on_policy(**kw):
    from nemo_minitron.distill.on_policy import OnPolicyConfig

    return OnPolicyConfig(**kw)


API_CASES: list[tuple[str, Callable[[], object], list[str]]] = [
    ("api-tc-moe-layer-freq", lambda: _nm().ModelConfig.from_transformer_config(
        _tc(num_moe_experts=2, moe_router_topk=2, moe_layer_freq=2)), ["moe_layer_freq=2"]),
    ("api-moe-topk", lambda: _nm().ModelConfig(num_moe_experts=2, moe_router_topk=3),
     ["model.moe_router_topk=3", "model.num_moe_experts=2"]),
    ("api-moe-ffn-tp", lambda: _nm().ModelConfig(
        num_moe_experts=4, ffn_hidden_size=64, moe_ffn_hidden_size=33).check_layout(2, 1),
     ["model.moe_ffn_hidden_size=33", "parallel.tensor_model_parallel_size=2"]),
    ("api-hetero-groups-tp", lambda: _nm().ModelConfig(
        num_layers=2, layer_shapes=_shapes({}, {"num_query_groups": 1})).check_layout(2, 1),
     ["model.layer_shapes[1].num_query_groups=1", "parallel.tensor_model_parallel_size=2"]),
    ("api-hetero-moe", lambda: _nm().ModelConfig(
        num_layers=1, num_moe_experts=2, layer_shapes=_shapes({})),
     ["model.layer_shapes", "heterogeneous MoE"]),
    ("api-moe-experts-ep", lambda: _nm().ModelConfig(num_moe_experts=4).check_layout(1, 1, 3),
     ["model.num_moe_experts=4", "parallel.expert_model_parallel_size=3"]),
    ("api-ep-dense", lambda: _nm().ModelConfig().check_layout(1, 1, 2),
     ["parallel.expert_model_parallel_size=2", "needs an MoE model"]),
    ("api-tc-qk-l2-norm", lambda: _nm().ModelConfig.from_transformer_config(
        _tc(qk_l2_norm=True)), ["qk_l2_norm"]),
    ("api-tc-relu", lambda: _nm().ModelConfig.from_transformer_config(
        _tc(activation_func=torch.relu, gated_linear_unit=False)), ["activation_func"]),
    ("api-tc-field-twice", lambda: _nm().ModelConfig.from_transformer_config(
        _tc(), hidden_size=32), ["hidden_size", "taken from"]),
    ("api-tc-unknown-field", lambda: _nm().ModelConfig.from_transformer_config(
        _tc(), vocab=128), ["vocab", "not a field"]),
    ("api-tc-vocab-zero", lambda: _nm().ModelConfig.from_transformer_config(
        _tc(), vocab_size=0), ["model.vocab_size"]),
    ("api-merge-one-input", lambda: _nm().merge([_sd()]), ["at least two"]),
    ("api-merge-method", lambda: _nm().merge([_sd(), _sd()], method="mean"), ["method="]),
    ("api-merge-unknown-setting", lambda: _nm().merge([_sd(), _sd()], tt=0.3), ["'tt'"]),
    ("api-merge-t-range", lambda: _nm().merge([_sd(), _sd()], t=1.5), ["merge.t=1.5"]),
    ("api-merge-no-config", lambda: _nm().merge([_sd(), _sd()], t=0.5), ["config="]),
    ("api-merge-shapes", lambda: _nm().merge(
        [_sd(), _sd(**{"decoder.final_layernorm.weight": (32,)})],
        config=_nm().ModelConfig(num_layers=2, hidden_size=64)),
     ["decoder.final_layernorm.weight", "one shape"]),
    ("api-merge-not-a-dict", lambda: _nm().merge([_sd(), [1, 2]],
                                                  config=_nm().ModelConfig()), ["list"]),
    ("api-plan-too-wide", lambda: _nm().make_plan(
        _nm().ModelConfig(num_layers=2, hidden_size=64), None,
        _nm().Target(hidden_size=128)), ["target.hidden_size=128"]),
    ("api-plan-moe-experts-below-topk", lambda: _moe_plan(dict(num_moe_experts=1)),
     ["target.num_moe_experts=1", "model.moe_router_topk=2"]),
    ("api-plan-moe-experts-ep", lambda: _moe_plan(dict(num_moe_experts=3), ep=2),
     ["target.num_moe_experts=3", "parallel.expert_model_parallel_size=2"]),
    ("api-plan-moe-ffn-tp", lambda: _moe_plan(dict(moe_ffn_hidden_size=33), tp=2),
     ["target.moe_ffn_hidden_size=33", "parallel.tensor_model_parallel_size=2"]),
    ("api-plan-dense-scores-on-moe", lambda: _moe_plan(
        dict(num_moe_experts=2), scores_of=dict(num_layers=2, hidden_size=64)),
     ["no experts scores", "dense model"]),
    ("api-plan-moe-target-on-dense", lambda: _nm().make_plan(
        _nm().ModelConfig(num_layers=2, hidden_size=64), None,
        _nm().Target(num_moe_experts=2)), ["target.num_moe_experts=2", "no routed experts"]),
    ("api-search-budget", lambda: _search(budget="flops"),
     ["search.budget='flops'", "total, active or memory"]),
    ("api-search-moe-experts-step", lambda: _search(num_moe_experts_step=0),
     ["search.num_moe_experts_step=0"]),
    ("api-search-moe-ffn-prune", lambda: _search(max_moe_ffn_hidden_size_prune=1.0),
     ["search.max_moe_ffn_hidden_size_prune=1.0", "[0, 1)"]),
    ("api-plan-layer-shape-tp", lambda: _nm().make_plan(
        _nm().ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128), None,
        _nm().Target(layer_shapes=_shapes({}, {"ffn_hidden_size": 33})), 2),
     ["target.layer_shapes[1].ffn_hidden_size=33", "parallel.tensor_model_parallel_size=2"]),
    ("api-kd-temperature", lambda: _nm().KDConfig(temperature=0), ["kd.temperature=0"]),
    ("api-kd-loss-cache", lambda: _nm().KDLoss(None, None, _nm().KDConfig(
        teacher_cache="c")), ["kd.teacher_cache", "KDLoss"]),
    ("api-kd-beta", lambda: _nm().KDConfig(divergence="gjsd", beta=2.0), ["kd.beta=2.0"]),
    ("api-kd-on-policy-fraction", lambda: _on_policy(fraction=1.5),
     ["kd.on_policy.fraction=1.5", "[0, 1]"]),
    ("api-kd-loss-on-policy", lambda: _nm().KDLoss(None, None, _nm().KDConfig(
        on_policy=_on_policy(fraction=0.5))), ["kd.on_policy", "KDLoss"]),
    ("api-kd-loss-microbatches", lambda: _nm().KDLoss(None, None, num_microbatches=0),
     ["num_microbatches=0"]),
]


def test_at_least_10_api_cases():
    assert len(API_CASES) >= 10
    assert len({c[0] for c in API_CASES}) == len(API_CASES)


@pytest.mark.parametrize("call, needles", [c[1:] for c in API_CASES],
                         ids=[c[0] for c in API_CASES])
def test_bad_api_input(call, needles):
    from nemo_minitron import ConfigError

    with pytest.raises(ConfigError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


# ---- nm.prune: refusals that need a built model (so parallel state), run in child processes.

def _gpt(seed: int = 0, spec: dict | None = None, **tc):
    """A tiny stock megatron-core GPTModel (in a child with parallel state)."""
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    config = _tc(ffn_hidden_size=128, use_cpu_initialization=True,
                 tensor_model_parallel_size=torch.distributed.get_world_size(), **tc)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(
        normalization="RMSNorm", **(spec or {})), vocab_size=256, max_sequence_length=32,
        position_embedding_type="rope")


def _prune(model, hidden_size: int = 64, scores=None, **target):
    """``nm.prune`` of ``model`` with a plan for the dense model of ``_gpt``'s shape."""
    from nemo_minitron.importance.baselines import random_scores

    nm = _nm()
    cfg = nm.ModelConfig.from_transformer_config(_tc(ffn_hidden_size=128, hidden_size=hidden_size),
                                                 vocab_size=256, seq_length=32)
    plan = nm.make_plan(cfg, scores or random_scores(cfg, 0),
                        nm.Target(hardware_multiple=1, **target))
    return nm.prune(model, plan)


def _other_weights():
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    scores = _nm().estimate_importance(_gpt(seed=1), tokens)
    return _prune(_gpt(seed=2), scores=scores, hidden_size=64, ffn_hidden_size=64)


PRUNE_CASES: list[tuple[str, int, Callable[[], object], list[str]]] = [
    ("api-prune-dense-plan-on-moe", 1, lambda: _prune(_gpt(
        spec=dict(num_experts=2), num_moe_experts=2, moe_router_topk=1,
        moe_router_pre_softmax=True), ffn_hidden_size=64),
     ["plan.source.num_moe_experts=None", "TransformerConfig.num_moe_experts=2"]),
    ("api-prune-qk-norm", 1, lambda: _prune(_gpt(spec=dict(qk_layernorm=True),
                                                 qk_layernorm=True), ffn_hidden_size=64),
     ["self_attention.q_layernorm", "supported"]),
    ("api-prune-another-model", 1, lambda: _prune(_gpt(), hidden_size=128, ffn_hidden_size=64),
     ["plan.source.hidden_size=128", "hidden_size=64"]),
    ("api-prune-scores-of-other-weights", 1, _other_weights, ["different weights"]),
    ("api-prune-not-divisible-by-tp", 2, lambda: _prune(_gpt(), ffn_hidden_size=63),
     ["target.ffn_hidden_size=63", "tensor_model_parallel_size=2"]),
]
"""(id, processes (= TP size), call, needles)."""


def prune_cases_job(out: str, world: int) -> None:
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=world), seed=0)
    got = {}
    for name, n, call, _ in PRUNE_CASES:
        if n == world:
            try:
                call()
                got[name] = "no error"
            except _nm().ConfigError as e:
                got[name] = str(e)
    if torch.distributed.get_rank() == 0:
        torch.save(got, out)


@pytest.fixture(scope="module")
def prune_refusals(tmp_path_factory) -> dict[str, str]:
    from tests.dist import spawn

    d, got = tmp_path_factory.mktemp("prune-refusals"), {}
    for world in sorted({c[1] for c in PRUNE_CASES}):
        spawn(prune_cases_job, world, str(d / f"{world}.pt"), world)
        got.update(torch.load(d / f"{world}.pt"))
    return got


@pytest.mark.dist
@pytest.mark.parametrize("name, needles", [(c[0], c[3]) for c in PRUNE_CASES],
                         ids=[c[0] for c in PRUNE_CASES])
def test_bad_prune_input(prune_refusals, name, needles):
    message = prune_refusals[name]
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message

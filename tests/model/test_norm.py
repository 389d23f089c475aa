"""``model/norm.py``: the local spec's torch norms under sequence parallelism. A TP=2 MoE model
built with ``sequence_parallel`` marks every norm's parameters (so ``finalize_model_grads`` sums
their gradients over TP), gives the logits of the same weights built without it, and is refused
by importance (its hooks would see sequence shards). Training equality: the TP=2 tests of
``tests/train/test_moe_stages.py`` and ``tests/distill/test_moe_kd.py``."""

from __future__ import annotations

import torch

from tests.dist import spawn

LAYOUT = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
              vocab_size=64, seq_length=16, num_moe_experts=4, moe_router_topk=2,
              moe_ffn_hidden_size=24, moe_shared_expert_intermediate_size=32)


def sequence_parallel_job() -> None:
    import pytest

    import nemo_minitron as nm
    from nemo_minitron.config import ConfigError, ModelConfig, ParallelConfig
    from nemo_minitron.model.build import build_model, training_sequence_parallel
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=2), seed=3)
    cfg = ModelConfig(**LAYOUT, qk_layernorm=True)
    assert training_sequence_parallel(cfg)
    assert not training_sequence_parallel(ModelConfig(**{**LAYOUT, "num_moe_experts": None,
                                                         "moe_router_topk": 2}))
    plain, sp = build_model(cfg), build_model(cfg, sequence_parallel=True)
    assert sp.config.sequence_parallel and not plain.config.sequence_parallel
    sp.load_state_dict(plain.state_dict())
    norms = {n: p for n, p in sp.named_parameters() if "layernorm" in n}
    assert any("final_layernorm" in n for n in norms) and any("q_layernorm" in n for n in norms)
    assert all(getattr(p, "sequence_parallel", False) for p in norms.values()), norms.keys()
    assert not any(getattr(p, "sequence_parallel", False)
                   for n, p in plain.named_parameters() if "layernorm" in n)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    plain.eval(), sp.eval()
    with torch.no_grad():
        torch.testing.assert_close(sp(tokens, pos, None), plain(tokens, pos, None),
                                   rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="sequence parallelism"):
        nm.ImportanceEstimator(sp)


def test_sequence_parallel_norms_logits_and_importance_refusal():
    spawn(sequence_parallel_job, 2)

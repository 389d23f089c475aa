"""Heterogeneous models to and from Hugging Face: the block-config format of the published
Llama-Nemotron models (``DeciLMForCausalLM``; transformers has no such class, so the references
are megatron-core's own ``HeterogeneousTransformerConfig`` parsing of the written
``block_configs``, a torch recomputation reading the exported weights by their DeciLM names, and
the logits after re-import), and a heterogeneous model whose layers all have one full shape as
plain Llama (against transformers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist import spawn
from tests.interop.hfmodels import hf_logits, tokens

# Hidden 384: FFN widths 256 and 512 are expressible as ffn_mult (1.0, 2.0), 40 is not.
HETERO = dict(num_layers=4, hidden_size=384, ffn_hidden_size=512, num_attention_heads=4,
              vocab_size=160, seq_length=16)


def shapes() -> list:
    from nemo_minitron.config.hetero import LayerShape as S

    return [S(num_query_groups=2, ffn_hidden_size=256), S(attention="linear", ffn_hidden_size=40),
            S(attention="no_op", mlp="linear"), S(mlp="no_op")]


def _save(path: Path, cfg) -> None:
    from nemo_minitron.checkpoint.io import save_checkpoint
    from nemo_minitron.model.build import build_model

    model = build_model(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # norms away from 1: a swapped norm would show
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.05)
                    + (1.0 if p.dim() == 1 else 0.0))
    save_checkpoint(path, model, model_cfg=cfg, tokenizer=None)


def export_job(root: str) -> None:
    from megatron.core.transformer.heterogeneous.heterogeneous_config import (
        HeterogeneousTransformerConfig,
    )
    from safetensors.torch import load_file

    from nemo_minitron.checkpoint.io import load_model
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.config.hetero import LayerShape as S
    from nemo_minitron.interop.hf_export import export_hf
    from nemo_minitron.interop.hf_import import import_hf
    from nemo_minitron.model.forward import forward_logits
    from nemo_minitron.parallel.runtime import init_distributed
    from tests.helpers.hetero import DECILM, hetero_logits

    r = Path(root)
    init_distributed(ParallelConfig(), seed=1)
    cfg = ModelConfig(**HETERO, layer_shapes=shapes())
    _save(r / "ck", cfg)
    export_hf(r / "ck", r / "hf")
    hf = json.loads((r / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["DeciLMForCausalLM"] and hf["model_type"] == "nemotron-nas"
    blocks = hf["block_configs"]
    assert blocks[0]["ffn"] == {"no_op": False, "replace_with_linear": False, "ffn_mult": 1.0}
    assert blocks[1]["ffn"]["intermediate_size"] == 40  # not expressible as ffn_mult
    assert blocks[0]["attention"]["n_heads_in_group"] == 2
    # megatron-core's own parsing of the written file gives every layer's shape back.
    parsed = HeterogeneousTransformerConfig(
        num_layers=4, hidden_size=384, num_attention_heads=4,
        heterogeneous_layers_config_encoded_json=json.dumps(hf)).per_block_parameters
    got = [(b.attention.no_op, b.attention.replace_with_linear, b.attention.num_query_groups,
            b.mlp.no_op, b.mlp.replace_with_linear, b.mlp.ffn_hidden_size) for b in parsed]
    assert got == [(False, False, 2, False, False, 256), (False, True, None, False, False, 40),
                   (True, False, None, False, True, None), (False, False, 4, True, False, None)]
    weights = load_file(str(r / "hf" / "model.safetensors"))
    assert "model.layers.1.self_attn.linear_attn.weight" in weights
    assert "model.layers.2.mlp.linear_mlp.weight" in weights
    assert not any(k.startswith("model.layers.2.input_layernorm") for k in weights)
    model, _, _ = load_model(r / "ck", ParallelConfig())
    ours = forward_logits(model, tokens())
    want = hetero_logits(weights, tokens(), [*shapes()[:3], S(num_query_groups=4, mlp="no_op")],
                         heads=4, names=DECILM)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    import_hf(r / "hf", r / "back")
    back, back_cfg, _ = load_model(r / "back", ParallelConfig())
    assert [back_cfg.layer_shape(i) for i in range(4)] == [cfg.layer_shape(i) for i in range(4)]
    torch.testing.assert_close(forward_logits(back, tokens()), ours, atol=1e-5, rtol=0)
    # Every layer the same full shape: plain Llama, which transformers loads.
    same = ModelConfig(**HETERO | dict(hidden_size=64, ffn_hidden_size=96),
                       layer_shapes=[S(num_query_groups=2, ffn_hidden_size=80)] * 4)
    _save(r / "ck_same", same)
    export_hf(r / "ck_same", r / "hf_same")
    model, _, _ = load_model(r / "ck_same", ParallelConfig())
    torch.save(forward_logits(model, tokens()), r / "same.pt")


@pytest.mark.dist
def test_hetero_export_in_block_config_format_and_back_and_uniform_as_llama(tmp_path):
    spawn(export_job, 1, str(tmp_path))
    hf = json.loads((tmp_path / "hf_same" / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and "block_configs" not in hf
    assert (hf["intermediate_size"], hf["num_key_value_heads"]) == (80, 2)
    torch.testing.assert_close(hf_logits(tmp_path / "hf_same", tokens()),
                               torch.load(tmp_path / "same.pt"), atol=1e-5, rtol=0)

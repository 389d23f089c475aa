"""A search as a pipeline stage: its output is the winner checkpoint, validate checks the
budget and sizes the stage by its largest candidate with the source as the frozen teacher."""

from __future__ import annotations

import pytest

from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.launch.pipeline import load_pipeline
from nemo_minitron.launch.run import run_validate
from nemo_minitron.launch.validate import memory_gib
from nemo_minitron.model.params import count_params

PIPELINE = """
workdir: {workdir}
inputs:
  teacher:
    path: /nonexistent/teacher
    model: {{num_layers: 4, hidden_size: 64, ffn_hidden_size: 128, num_attention_heads: 4,
             num_query_groups: 2, seq_length: 64, vocab_size: 1024}}
cluster: {{nodes: 1, gpus_per_node: 1}}
stages:
  - name: search
    verb: search
    args: ["{{inputs.teacher}}", "{{out}}"]
    config:
      search: {{target_params: 205200, tolerance: 0.01, hidden_size_step: 64,
               ffn_hidden_size_step: 64}}
      train: {{micro_batch_size: 4, global_batch_size: 8}}
  - name: heal
    verb: distill
    args: ["{{inputs.teacher}}", "{{stages.search.output}}"]
    config:
      train: {{micro_batch_size: 4, global_batch_size: 8, train_iters: 10}}
"""
SRC = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, seq_length=64, vocab_size=1024)
# The largest of the three candidates within 1% of 205,200 parameters.
BIG = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=64, num_attention_heads=2,
                  num_query_groups=1, kv_channels=16, seq_length=64, vocab_size=1024)


def test_search_stage_validates(tmp_path):
    recipe = tmp_path / "p.yaml"
    recipe.write_text(PIPELINE.format(workdir=tmp_path / "w"))
    pipe = load_pipeline(recipe)
    assert pipe.stages[0].output == tmp_path / "w" / "search" / "winner"
    assert pipe.stages[0].argv[:2] == ["/nonexistent/teacher", str(tmp_path / "w" / "search")]
    assert pipe.stages[1].needs == ["search"]
    flags = dict.fromkeys(("nodes", "gpus_per_node", "tasks_per_node"))
    search, heal = run_validate(str(recipe), [], flags=flags, gpu_memory_gb=80)
    assert count_params(BIG) == 205376 and search["params"] == 205376
    assert search["memory_gib"] == round(memory_gib(BIG, 1, 1, 1, 4, frozen=[SRC]), 1)
    assert heal["params"] == 205376
    with pytest.raises(ConfigError, match="^stage search: search.target_params=100000: no "
                                          "candidate within .* nearest: L2-H64-F64-A2-G1"):
        run_validate(str(recipe), ["search.search.target_params=100000"], flags=flags,
                     gpu_memory_gb=80)

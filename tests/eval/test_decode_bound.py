"""``benchmarks/decode_bound.py`` runs on a teacher and a smaller student, and the weights it
multiplies by are exactly the matrix-product weights that ``eval.bench``'s FLOP model counts
(recomputed here from the stored configurations, not from the modules the benchmark reads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def gemm_weights(cfg) -> int:
    """Weights of the matrix products of one decode step: qkv, proj, fc1, fc2 of every layer
    and the output layer."""
    h, d = cfg.hidden_size, cfg.head_dim
    a, g = cfg.num_attention_heads, cfg.query_groups
    fc1 = cfg.ffn_hidden_size * (2 if cfg.activation == "swiglu" else 1)
    layer = (a + 2 * g) * d * h + h * a * d + fc1 * h + h * cfg.ffn_hidden_size
    return cfg.num_layers * layer + cfg.vocab_size * h


def test_decode_bound_weights_match_the_flop_model(pair):
    from nemo_minitron.checkpoint.io import load_model_config
    from nemo_minitron.eval.bench import flops_per_token

    teacher, student = pair
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_bound.py"), teacher,
                          student, "--batch", "2", "--prompt", "8", "--decode-tokens", "2",
                          "--repeats", "1"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for name, ckpt in (("teacher", teacher), ("pruned", student)):
        cfg = load_model_config(ckpt)
        assert result["weight_bytes"][name] == 4 * gemm_weights(cfg), name  # fp32
        # The FLOP model's products at zero context: those weights plus the 1-D norm weights.
        norms = 2 * cfg.num_layers * cfg.hidden_size * (2 if cfg.normalization == "LayerNorm"
                                                        else 1)
        assert flops_per_token(cfg, 0) == 2 * (gemm_weights(cfg) + norms), name
    for part in ("step", "products", "attention"):
        assert result[part]["teacher_ms"] > 0 and result[part]["pruned_ms"] > 0

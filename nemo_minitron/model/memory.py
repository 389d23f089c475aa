"""Peak memory per GPU of a training (or forward-only) job, estimated without a GPU: used by
``validate`` (a pipeline before submission) and ``train.preflight`` (a run before it starts).

Memory per GPU, for the pipeline stage holding the most parameters (bytes; s = seq_length,
b = micro_batch_size, h = hidden, a/g/d = heads/query groups/head dim, f = ffn, k = 2 for
SwiGLU else 1, V = padded vocab, L = layers, TP/PP/DP as usual):

- trained parameters P_gpu = (the stage's layer_params + V*h [embedding or output layer; both when
  PP = 1]) / TP, at 2 (bf16 weights) + 4 (fp32 main grads) + 12/DP (fp32 master weights and the
  two Adam moments, sharded by Megatron's distributed optimizer) bytes each;
- frozen models the stage also reads (a distillation teacher): 2 bytes per parameter / (TP*PP);
- forward-only stages (``prune``: fp32 model, importance hooks): 4 bytes per parameter;
- activations of one micro-batch and layer, every bf16 tensor kept for backward:
  2*s*b*(4h + ((a+2g)*d + a*d + k*f + f)/TP) (two norms' inputs and outputs, QKV, attention
  output with flash attention, i.e. no s x s scores, fc1 and activation outputs; Korthikanti
  et al. 2022 without sequence parallelism), summed over the L layers (1F1B keeps PP
  micro-batches of L/PP layers on the first stage); forward-only stages keep the largest
  layer's; a heterogeneous model's layers each count their own sizes (a linear block keeps
  its norm's 2h and h, a no-op block nothing);
- logits: 2 x 4*s*b*V/TP (fp32 logits and their gradient; one more for a teacher's logits);
- a 5 GiB reserve for the CUDA context, NCCL buffers and fragmentation.

The sum must stay under ``gpu_memory_gb`` (80 by default). CPU jobs (no GPUs) skip it.
"""

from __future__ import annotations

from nemo_minitron.config import ModelConfig
from nemo_minitron.model.params import count_params, per_layer_params

GiB = 1024**3
"""Bytes per GiB."""
RESERVE_GIB = 5.0
"""CUDA context, NCCL buffers and fragmentation."""


def memory_gib(m: ModelConfig, tp: int, pp: int, dp: int, micro_batch: int, *,
               forward_only: bool = False, frozen: list[ModelConfig] = ()) -> float:  # type: ignore[assignment]
    """The estimate documented above, in GiB."""
    v, h, s, b = m.vocab_size or 0, m.hidden_size, m.seq_length, micro_batch
    ends = v * h * (1 if m.share_embeddings_and_output_weights or pp > 1 else 2)
    layers, per_stage = per_layer_params(m), -(-m.num_layers // pp)
    stage = max(sum(layers[i:i + per_stage]) for i in range(0, m.num_layers, per_stage))
    p_gpu = (stage + ends) / tp
    acts = [_activations(m, i, tp) * 2 * s * b for i in range(m.num_layers)]
    logits = 2 * 4 * s * b * v / tp
    if forward_only:
        total = 4 * p_gpu + max(acts) + logits / 2
    else:
        total = (6 + 12 / dp) * p_gpu + sum(acts) + logits
    for t in frozen:
        total += 2 * count_params(t) / (tp * pp) + 4 * s * b * (t.vocab_size or 0) / tp
    return total / GiB + RESERVE_GIB


def _activations(m: ModelConfig, layer: int, tp: int) -> float:
    """bf16 activations per token that layer ``layer`` keeps for backward (module docstring)."""
    shape, one = m.layer_shape(layer), m.layer_config(layer)
    h, k = m.hidden_size, 2 if m.activation == "swiglu" else 1
    a, g, d, f = one.num_attention_heads, one.query_groups, one.head_dim, one.ffn_hidden_size
    attn = {"full": (a + 2 * g) * d + a * d, "linear": h, "no_op": 0}[shape.attention]
    mlp = {"full": k * f + f, "linear": h, "no_op": 0}[shape.mlp]
    norms = 2 * h * sum(kind != "no_op" for kind in (shape.attention, shape.mlp))
    return norms + (attn + mlp) / tp

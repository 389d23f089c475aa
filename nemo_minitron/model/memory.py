"""Peak memory per GPU of a training (or forward-only) job, estimated without a GPU: used by
``validate`` (a pipeline before submission) and ``train.preflight`` (a run before it starts).

Memory per GPU, for the pipeline stage holding the most parameters (bytes; s = seq_length,
b = micro_batch_size, h = hidden, a/g/d = heads/query groups/head dim, f = ffn, k = 2 for
SwiGLU else 1, V = padded vocab, L = layers, TP/PP/DP as usual):

- trained parameters P_gpu = (L/PP * layer_params + V*h [embedding or output layer; both when
  PP = 1]) / TP, at 2 (bf16 weights) + 4 (fp32 main grads) + 12/DP (fp32 master weights and the
  two Adam moments, sharded by Megatron's distributed optimizer) bytes each;
- frozen models the stage also reads (a distillation teacher): 2 bytes per parameter / (TP*PP);
- forward-only stages (``prune``: fp32 model, importance hooks): 4 bytes per parameter;
- activations of one micro-batch and layer, every bf16 tensor kept for backward:
  2*s*b*(4h + ((a+2g)*d + a*d + k*f + f)/TP) (two norms' inputs and outputs, QKV, attention
  output with flash attention, i.e. no s x s scores, fc1 and activation outputs; Korthikanti
  et al. 2022 without sequence parallelism), times L (1F1B keeps PP micro-batches of L/PP
  layers on the first stage); forward-only stages keep one layer's worth;
- logits: 2 x 4*s*b*V/TP (fp32 logits and their gradient; one more for a teacher's logits);
- a 5 GiB reserve for the CUDA context, NCCL buffers and fragmentation.

The sum must stay under ``gpu_memory_gb`` (80 by default). CPU jobs (no GPUs) skip it.
"""

from __future__ import annotations

from nemo_minitron.config import ModelConfig
from nemo_minitron.model.params import count_params, layer_params

GiB = 1024**3
"""Bytes per GiB."""
RESERVE_GIB = 5.0
"""CUDA context, NCCL buffers and fragmentation."""


def memory_gib(m: ModelConfig, tp: int, pp: int, dp: int, micro_batch: int, *,
               forward_only: bool = False, frozen: list[ModelConfig] = ()) -> float:  # type: ignore[assignment]
    """The estimate documented above, in GiB."""
    v, h, s, b = m.vocab_size or 0, m.hidden_size, m.seq_length, micro_batch
    ends = v * h * (1 if m.share_embeddings_and_output_weights or pp > 1 else 2)
    p_gpu = (m.num_layers / pp * layer_params(m) + ends) / tp
    k = 2 if m.activation == "swiglu" else 1
    a, g, d, f = m.num_attention_heads, m.query_groups, m.head_dim, m.ffn_hidden_size
    act_layer = 2 * s * b * (4 * h + ((a + 2 * g) * d + a * d + k * f + f) / tp)
    logits = 2 * 4 * s * b * v / tp
    if forward_only:
        total = 4 * p_gpu + act_layer + logits / 2
    else:
        total = (6 + 12 / dp) * p_gpu + act_layer * m.num_layers + logits
    for t in frozen:
        total += 2 * count_params(t) / (tp * pp) + 4 * s * b * (t.vocab_size or 0) / tp
    return total / GiB + RESERVE_GIB

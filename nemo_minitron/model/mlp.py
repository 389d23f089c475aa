"""The local spec's MLP: Megatron's ``MLP`` with a shorter SwiGLU path on CPU and GPU alike.

megatron-core 0.16's unfused gated activation computes ``silu(gate) * (up + glu_linear_offset)``:
with the default offset of 0 the addition is a full pass over the ``[s, b, ffn]`` activations
(and its backward) that changes nothing. ``SwiGLUMLP`` computes ``silu(gate) * up`` when that
is all the configuration asks for (SiLU, gated, no bias, no clamp, offset 0, no per-token
scale, no TE activation, no bias-activation fusion) and leaves every other case to Megatron.
Same parameters and sharded state dict, so checkpoints are the same; outputs equal Megatron's
(``tests/model/test_attention.py``).

Megatron's ``TransformerLayer`` passes ``tp_group`` only to a spec whose module is ``MLP``
itself and warns "Unknown MLP type" for a subclass; ``MLP`` then takes the default tensor-parallel
group, the one this project always uses. ``quiet_unknown_mlp`` drops that warning while our own
spec is built."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class SwiGLUMLP(MLP):
    """Megatron's ``MLP`` without the no-op ``+ glu_linear_offset`` of its SwiGLU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        # Fixed by the configuration: decided once, not per forward.
        self.plain_swiglu = (
            c.gated_linear_unit and self.activation_func is F.silu and not c.add_bias_linear
            and not c.bias_activation_fusion and not c.use_te_activation_func
            and c.activation_func_clamp_value is None and c.glu_linear_offset == 0)

    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        """``[s, b, h]`` -> ``(output [s, b, h], bias)``, as ``MLP.forward``."""
        if per_token_scale is not None or not self.plain_swiglu:
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        fc1, _ = self.linear_fc1(hidden_states)
        gate, up = torch.chunk(fc1, 2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


@contextlib.contextmanager
def quiet_unknown_mlp() -> Iterator[None]:
    """Drop Megatron's "Unknown MLP type" warning (see the module docstring) inside."""
    log = logging.getLogger("megatron.core.transformer.transformer_layer")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)

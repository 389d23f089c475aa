"""Aggregations against direct formulas, and independence from how batches are split."""

from __future__ import annotations

import pytest
import torch

from nemo_minitron.importance.aggregate import Aggregator


def _reference(x: torch.Tensor, batch_agg: str, seq_agg: str) -> torch.Tensor:
    x = x.double()  # [s, b, u]
    per_seq = {"mean": x.mean(0), "l2": x.pow(2).sum(0).sqrt(),
               "var": ((x - x.mean(0)) ** 2).mean(0)}[seq_agg]
    return {"mean": per_seq.mean(0), "l2": per_seq.pow(2).sum(0).sqrt(),
            "var": ((per_seq - per_seq.mean(0)) ** 2).mean(0)}[batch_agg].float()


@pytest.mark.parametrize("batch_agg", ["mean", "l2", "var"])
@pytest.mark.parametrize("seq_agg", ["mean", "l2", "var"])
def test_matches_formula_and_is_split_invariant(batch_agg, seq_agg):
    x = torch.rand(7, 12, 5, generator=torch.Generator().manual_seed(0))
    whole = Aggregator(5, batch_agg, seq_agg)
    whole.update(x)
    parts = Aggregator(5, batch_agg, seq_agg)
    for chunk in x.split([3, 4, 5], dim=1):
        parts.update(chunk)
    ref = _reference(x, batch_agg, seq_agg)
    torch.testing.assert_close(whole.result(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(parts.result(), ref, atol=1e-6, rtol=1e-6)


def test_rejects_unknown_aggregation():
    with pytest.raises(ValueError, match="batch_agg='max' must be one of"):
        Aggregator(3, "max", "mean")  # type: ignore[arg-type]

"""The compiled summary pass: each row's values as row_changes computes them, the means as
summary_columns takes them (up to summation order), and the same bits for a tensor alone or in a
batch."""

from __future__ import annotations

import math

import numpy as np
import torch

from dora_analysis.analysis import fused_summary
from dora_analysis.analysis.decomposition import (
    RowScalars,
    row_changes,
    row_scalars_many,
    summarize_scalars,
    summary_columns,
)

EPS64 = float(np.finfo(np.float64).eps)


def _edge_scalars() -> RowScalars:
    """One row per case: ordinary, zero base, zero tuned (d = -a), tuned_sq rounding below zero,
    cos clamped at 1, cos <= 0 (opposite rows), a NaN and an Inf base, a NaN update, tiny and huge."""
    base_sq = [4.0, 0.0, 4.0, 1.0, 1.0, 1.0, math.nan, math.inf, 1.0, 1e-300, 1e300]
    dot = [0.5, 0.0, -4.0, -0.5 - 1e-17, 0.0, -2.0, 0.0, 0.0, math.nan, 1e-310, -1e299]
    update_sq = [0.3, 2.0, 4.0, 0.0, 0.0, 4.0, 0.0, 0.0, 1.0, 1e-305, 1e299]
    return RowScalars(*(torch.tensor(v, dtype=torch.float64)[:, None] for v in (base_sq, dot, update_sq)))


def test_one_row_tensors_carry_each_rows_values_bit_for_bit() -> None:
    """With one row per tensor, the means are the row's own values: they must be row_changes' bits."""
    scalars = _edge_scalars()
    changes = row_changes(scalars)
    sums = fused_summary.tensor_sums(
        *(getattr(scalars, f).numpy().copy() for f in ("base_sq", "dot", "update_sq"))
    )
    valid = changes.valid[:, 0].numpy()
    np.testing.assert_array_equal(sums[2], valid.astype(float))
    for row, (name, field) in enumerate(
        [("magnitude", "magnitude_change"), ("direction", "direction_change")]
    ):
        want = getattr(changes, field)[:, 0].numpy()
        np.testing.assert_array_equal(sums[3 + row][valid], want[valid], err_msg=name)
        assert np.isnan(sums[3 + row][~valid]).all()
    np.testing.assert_array_equal(sums[5], changes.base_magnitude[:, 0].numpy())
    np.testing.assert_array_equal(sums[6], changes.tuned_magnitude[:, 0].numpy())


def test_many_rows_agree_with_the_torch_summary() -> None:
    g = torch.Generator().manual_seed(4)
    base = torch.randn(40, 16, 24, generator=g, dtype=torch.float64)
    tuned = base * (1 + 0.1 * torch.randn(40, 16, 1, generator=g, dtype=torch.float64))
    tuned += 0.01 * torch.randn(base.shape, generator=g, dtype=torch.float64)
    base[3, 5] = 0.0  # an excluded row
    base[7] = 0.0  # no valid rows
    tuned[9, 2, 1] = math.inf  # a nonfinite tuned tensor
    base[11, 0, 0] = math.nan  # a nonfinite base tensor
    per_tensor = [row_scalars_many(b.float(), [t.float()]) for b, t in zip(base, tuned, strict=True)]
    scalars = RowScalars(
        *(torch.cat([getattr(s, f) for s in per_tensor]) for f in ("base_sq", "dot", "update_sq"))
    )
    got = summarize_scalars(scalars)
    want = summary_columns(row_changes(scalars))
    assert list(got.status) == list(want.status)
    assert {"ok", "no valid rows", "nonfinite tuned", "nonfinite base"} <= set(got.status)
    np.testing.assert_array_equal(got.rows_excluded, want.rows_excluded)
    # sums of 16 nonnegative terms in another order: within 16 eps relative
    for field in ("delta_magnitude", "delta_direction", "base_magnitude_mean", "tuned_magnitude_mean"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=16 * EPS64, atol=0)


def test_a_tensor_summarized_alone_or_in_a_batch_is_the_same_bits() -> None:
    g = torch.Generator().manual_seed(8)
    scalars = RowScalars(
        torch.rand(30, 50, generator=g, dtype=torch.float64) + 0.1,
        0.01 * torch.randn(30, 50, generator=g, dtype=torch.float64),
        0.001 * torch.rand(30, 50, generator=g, dtype=torch.float64),
    )
    batch = summarize_scalars(scalars)
    for i in (0, 13, 29):
        alone = summarize_scalars(
            RowScalars(*(getattr(scalars, f)[i : i + 1] for f in ("base_sq", "dot", "update_sq")))
        )
        for field, values in zip(batch._fields, batch, strict=True):
            np.testing.assert_array_equal(values[i : i + 1], getattr(alone, field), err_msg=field)

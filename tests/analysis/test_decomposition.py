"""The ΔM/ΔD math against an independent float64 NumPy reference, and its invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dora_analysis.analysis.decomposition import (
    direction,
    magnitude,
    row_changes,
    row_scalars,
    row_scalars_many,
    summarize,
    summarize_many,
    tensor_delta,
)


def reference(base: np.ndarray, tuned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row |m - m0| and 1 - cos in float64, independently: 1 - cos = |u - v|^2 / 2 for unit rows."""
    base, tuned = base.astype(np.float64), tuned.astype(np.float64)
    m0 = np.linalg.norm(base, axis=1)
    m = np.linalg.norm(tuned, axis=1)
    u = base / m0[:, None]
    v = tuned / m[:, None]
    return np.abs(m - m0), 0.5 * np.sum((u - v) ** 2, axis=1)


def _stored(values: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return values.to(dtype).to(torch.float64).numpy()


def _pair(rows: int, cols: int, eps: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    noise = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return base, base + eps[:, None] * noise


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64_reference_on_random_matrices(dtype: torch.dtype) -> None:
    eps = torch.logspace(-1, -3, 64, dtype=torch.float64)
    base, tuned = _pair(64, 96, eps)
    base, tuned = base.to(dtype), tuned.to(dtype)
    ref_mag, ref_dir = reference(_stored(base, dtype), _stored(tuned, dtype))
    changes = row_changes(row_scalars(base, tuned))
    np.testing.assert_allclose(changes.direction_change.numpy(), ref_dir, rtol=1e-3)
    np.testing.assert_allclose(changes.magnitude_change.numpy(), ref_mag, rtol=1e-3, atol=1e-7)
    delta = summarize(changes)
    assert delta.delta_direction == pytest.approx(ref_dir.mean(), rel=1e-3)
    assert delta.delta_magnitude == pytest.approx(ref_mag.mean(), rel=1e-3)
    assert delta.rows == 64 and delta.rows_excluded == 0 and delta.status == "ok"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_direction_changes_stay_accurate(dtype: torch.dtype) -> None:
    """Rows whose 1 - cos is ~1e-8: naive float32 ``1 - cos`` is pure rounding noise there."""
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(32, 256, generator=generator).to(dtype)
    # One step of the stored dtype's grid in a few coordinates per row: a genuinely tiny update.
    tuned = base.clone()
    idx = torch.randint(0, 256, (32, 4), generator=generator)
    bumped = tuned.gather(1, idx).float()
    step = torch.finfo(dtype).eps * bumped.abs()
    tuned.scatter_(1, idx, (bumped + step).to(dtype))
    ref_mag, ref_dir = reference(_stored(base, dtype), _stored(tuned, dtype))
    assert ref_dir.max() < (1e-6 if dtype == torch.float32 else 1e-5) and ref_dir.min() > 0
    changes = row_changes(row_scalars(base, tuned))
    np.testing.assert_allclose(changes.direction_change.numpy(), ref_dir, rtol=1e-3)
    np.testing.assert_allclose(changes.magnitude_change.numpy(), ref_mag, rtol=1e-3)
    naive = 1 - torch.nn.functional.cosine_similarity(base.float(), tuned.float(), dim=1)
    naive_error = np.abs(naive.double().numpy() - ref_dir) / ref_dir
    assert naive_error.max() > 1e-2, "the case is meant to defeat a naive float32 1 - cos"


def test_float64_accuracy_at_1e_minus_8() -> None:
    eps = torch.full((16,), 1e-4, dtype=torch.float64)  # 1 - cos ~ eps^2 / 2 = 5e-9
    base, tuned = _pair(16, 512, eps, seed=2)
    ref_mag, ref_dir = reference(base.numpy(), tuned.numpy())
    assert 1e-9 < ref_dir.mean() < 1e-7
    changes = row_changes(row_scalars(base, tuned))
    np.testing.assert_allclose(changes.direction_change.numpy(), ref_dir, rtol=1e-6)
    np.testing.assert_allclose(changes.magnitude_change.numpy(), ref_mag, rtol=1e-6)


def test_scaling_rows_leaves_direction_unchanged() -> None:
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(40, 64, generator=generator)
    factors = torch.rand(40, generator=generator) * 3 + 0.1
    delta = tensor_delta(base, base * factors[:, None])
    assert delta.delta_direction == pytest.approx(0.0, abs=1e-12)
    expected = ((factors - 1).abs() * torch.linalg.norm(base, dim=1)).mean()
    assert delta.delta_magnitude == pytest.approx(float(expected), rel=1e-5)


def test_orthogonal_input_transform_leaves_magnitudes_unchanged() -> None:
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(24, 48, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=generator, dtype=torch.float64))
    delta = tensor_delta(base, base @ q)
    assert delta.delta_magnitude == pytest.approx(0.0, abs=1e-12)
    assert delta.delta_direction > 0.1  # the directions did move


def test_opposite_and_orthogonal_rows() -> None:
    base = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    tuned = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    changes = row_changes(row_scalars(base, tuned))
    np.testing.assert_allclose(changes.direction_change.numpy(), [2.0, 1.0, 0.0], atol=1e-12)


def test_zero_rows_are_excluded_and_counted_not_nan() -> None:
    base = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    tuned = torch.tensor([[1.0, 2.5], [1.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    delta = tensor_delta(base, tuned)
    assert delta.rows == 4 and delta.rows_excluded == 2 and delta.status == "ok"
    ref_mag, ref_dir = reference(base[[0, 2]].numpy(), tuned[[0, 2]].numpy())
    assert delta.delta_direction == pytest.approx(ref_dir.mean(), rel=1e-9)
    assert delta.delta_magnitude == pytest.approx(ref_mag.mean(), rel=1e-9)


def test_all_rows_zero_is_reported() -> None:
    delta = tensor_delta(torch.zeros(3, 4), torch.ones(3, 4))
    assert delta.status == "no valid rows" and delta.rows_excluded == 3
    assert math.isnan(delta.delta_direction)


@pytest.mark.parametrize("side", ["base", "tuned"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_weights_are_reported_not_averaged(side: str, bad: float) -> None:
    base, tuned = torch.ones(4, 3), torch.ones(4, 3) * 2
    (base if side == "base" else tuned)[2, 1] = bad
    delta = tensor_delta(base, tuned)
    assert delta.status == f"nonfinite {side}"
    assert math.isnan(delta.delta_direction) and math.isnan(delta.delta_magnitude)


def test_blocks_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:

    eps = torch.linspace(1e-3, 1e-1, 50, dtype=torch.float64)
    base, tuned = _pair(50, 30, eps, seed=5)
    whole = tensor_delta(base.float(), tuned.float())
    monkeypatch.setattr("dora_analysis.analysis.row_blocks.CPU_BLOCK_ELEMENTS", 64)  # two rows a block
    blocked = tensor_delta(base.float(), tuned.float())
    assert blocked == whole


def test_a_series_is_summarized_as_each_tensor_alone() -> None:
    """Batching a series keeps each tuned tensor's status and means its own (float64 NumPy reference)."""
    eps = torch.linspace(1e-3, 1e-1, 40, dtype=torch.float64)
    base, ok = _pair(40, 24, eps, seed=6)
    some_zero_rows = ok.clone()
    some_zero_rows[[3, 17]] = 0.0
    nonfinite = ok.clone()
    nonfinite[5, 2] = math.inf
    tuned = [ok, nonfinite, torch.zeros_like(ok), some_zero_rows]
    series = summarize_many(row_changes(row_scalars_many(base, tuned)))
    for got, alone in zip(series, [tensor_delta(base, t) for t in tuned], strict=True):
        np.testing.assert_equal(tuple(got), tuple(alone))  # NaN where NaN, else equal
    assert [d.status for d in series] == ["ok", "nonfinite tuned", "no valid rows", "ok"]
    assert series[3].rows_excluded == 2
    keep = [j for j in range(40) if j not in (3, 17)]
    ref_mag, ref_dir = reference(base[keep].numpy(), some_zero_rows[keep].numpy())
    assert series[3].delta_direction == pytest.approx(ref_dir.mean(), rel=1e-9)
    assert series[3].delta_magnitude == pytest.approx(ref_mag.mean(), rel=1e-9)
    assert series[3].tuned_magnitude_mean == pytest.approx(
        np.linalg.norm(some_zero_rows.numpy(), axis=1).mean(), rel=1e-12
    )


def test_magnitude_and_direction() -> None:
    rows = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.bfloat16)
    torch.testing.assert_close(magnitude(rows), torch.tensor([5.0, 0.0]))
    assert magnitude(rows).dtype == torch.float32
    torch.testing.assert_close(direction(rows), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\) != tuned \(3, 2\)"):
        row_scalars(torch.ones(2, 3), torch.ones(3, 2))

"""merge_low_rank against an independent float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dora_analysis.factors import low_rank_fit_problem, merge_low_rank
from dora_analysis.readers.base import LowRankUpdate


def _reference(
    w0: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, m: np.ndarray | None, ffio: bool
) -> np.ndarray:
    w = w0.T if ffio else w0
    v = w + scale * (b @ a)
    if m is not None:
        v = m[:, None] * v / np.sqrt((v**2).sum(axis=1, keepdims=True))
    return v.T if ffio else v


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("ffio", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_matches_float64_reference(dora: bool, ffio: bool, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    out_dim, in_dim, r = 12, 7, 3
    w0 = torch.randn(out_dim, in_dim, generator=g)
    w0 = (w0.T.contiguous() if ffio else w0).to(dtype)
    a = torch.randn(r, in_dim, generator=g).to(dtype)
    b = torch.randn(out_dim, r, generator=g).to(dtype)
    m = (torch.rand(out_dim, generator=g) + 0.5) if dora else None
    update = LowRankUpdate("x.weight", a, b, 0.75, m, ffio)
    merged = merge_low_rank(w0, update)
    assert merged.dtype == torch.float32 and merged.shape == w0.shape
    f64 = lambda t: t.to(torch.float64).numpy()  # noqa: E731
    expected = _reference(f64(w0), f64(a), f64(b), 0.75, None if m is None else f64(m), ffio)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-5, atol=1e-5)
    if dora:  # every output unit's norm is its magnitude
        rows = merged.T if ffio else merged
        np.testing.assert_allclose(torch.linalg.norm(rows, dim=1).numpy(), m.numpy(), rtol=1e-5)


def test_zero_update_keeps_base_and_leaves_input_alone() -> None:
    w0 = torch.randn(4, 5)
    before = w0.clone()
    update = LowRankUpdate("w", torch.randn(2, 5), torch.zeros(4, 2), 2.0)
    assert torch.equal(merge_low_rank(w0, update), w0)
    assert torch.equal(w0, before)


@pytest.mark.parametrize(
    ("base", "a", "b", "m", "ffio", "needle"),
    [
        ((4, 5), (2, 5), (4, 3), None, False, "rank"),
        ((4, 6), (2, 5), (4, 2), None, False, "(4, 5)"),
        ((4, 5), (2, 5), (4, 2), None, True, "(in, out)"),
        ((4, 5), (2, 5), (4, 2), (5,), False, "magnitude"),
        ((4, 5), (2, 5, 1), (4, 2), None, False, "2-D"),
    ],
)
def test_fit_problems_are_described(base, a, b, m, ffio, needle) -> None:
    problem = low_rank_fit_problem(base, a, b, m, ffio)
    assert problem is not None and needle in problem
    with pytest.raises(ValueError, match="w.weight"):
        merge_low_rank(
            torch.zeros(base),
            LowRankUpdate(
                "w.weight", torch.zeros(a), torch.zeros(b), 1.0, None if m is None else torch.ones(m), ffio
            ),
        )


def test_fitting_shapes_have_no_problem() -> None:
    assert low_rank_fit_problem((4, 5), (2, 5), (4, 2), (4,), False) is None
    assert low_rank_fit_problem((5, 4), (2, 5), (4, 2), (4,), True) is None


@pytest.mark.parametrize("dora", [False, True])
def test_float64_merge_is_the_spectral_analysis_merge(dora: bool) -> None:
    """One merge, dtype a parameter: float64 (what the spectral analysis uses, with ``rows=True``) gives
    the NumPy reference to float64 rounding; ``rows=True`` takes a Conv1D's base already in row layout."""
    import dataclasses

    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(16, 9, generator=g, dtype=torch.float64)
    a, b = torch.randn(4, 9, generator=g), torch.randn(16, 4, generator=g)
    m = (torch.rand(16, generator=g) + 0.5) if dora else None
    update = LowRankUpdate("x.weight", a, b, 0.5, m)
    merged = merge_low_rank(w0, update, dtype=torch.float64)
    assert merged.dtype == torch.float64
    # a Conv1D update over its base in row layout: the same product as the (in, out) base merged
    conv1d = dataclasses.replace(update, fan_in_fan_out=True)
    assert torch.equal(
        merge_low_rank(w0, conv1d, torch.float64, rows=True), merged
    )  # same kernels, same data
    # from the (in, out) base: the norms reduce over another memory layout, so equal to float64 rounding
    # (each row norm sums 9 squares: a few units of 2^-53 relative, scaled by |m|)
    from_columns = merge_low_rank(w0.T.contiguous(), conv1d, torch.float64).T
    assert ((from_columns - merged).abs() <= 16 * 2.0**-53 * merged.abs().max()).all()
    f64 = lambda t: t.to(torch.float64).numpy()  # noqa: E731
    expected = _reference(f64(w0), f64(a), f64(b), 0.5, None if m is None else f64(m), False)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-12, atol=1e-12)

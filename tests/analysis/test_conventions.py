"""The public re-runs' conventions against an independent float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dora_analysis.analysis.conventions import CONVENTIONS, MERGE_SCALED, convention_deltas


def reference(w0: np.ndarray, w: np.ndarray, convention: str) -> tuple[float, float]:
    m0, m = np.linalg.norm(w0, axis=1), np.linalg.norm(w, axis=1)
    dm = float((m - m0).mean()) if convention == "signed_magnitude" else float(np.abs(m - m0).mean())
    if convention == "column_cosine":
        w0, w = w0.T, w.T  # one cosine per input unit (a column of the (out, in) weight)
    cos = (w0 * w).sum(1) / (np.linalg.norm(w0, axis=1) * np.linalg.norm(w, axis=1))
    return dm, float((1 - cos).mean())


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_convention_matches_numpy_float64(convention, dtype):
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(24, 40, generator=generator).to(dtype)
    w = (w0.double() * (1 + 0.2 * torch.randn(24, 1, generator=generator, dtype=torch.float64))).to(dtype)
    w = w + (0.05 * torch.randn(24, 40, generator=generator)).to(dtype)
    expected = reference(w0.double().numpy(), w.double().numpy(), convention)
    assert convention_deltas(w0, w, convention) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_the_conventions_disagree_where_they_should():
    w0 = torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shrunk = 0.5 * w0  # rows keep their direction; every magnitude halves
    assert convention_deltas(w0, shrunk, "paper")[1] == pytest.approx(0, abs=1e-12)
    assert (
        convention_deltas(w0, shrunk, "signed_magnitude")[0] < 0 < convention_deltas(w0, shrunk, "paper")[0]
    )
    scaled_rows = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64)) @ w0  # rows scaled unequally
    assert convention_deltas(w0, scaled_rows, "paper")[1] == pytest.approx(0, abs=1e-12)
    assert convention_deltas(w0, scaled_rows, "column_cosine")[1] > 1e-3  # columns do turn
    assert MERGE_SCALED == {"paper": True, "column_cosine": True, "signed_magnitude": True, "no_scale": False}


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown convention"):
        convention_deltas(torch.ones(2, 2), torch.ones(2, 2), "rows")
    with pytest.raises(ValueError, match="equal 2-D"):
        convention_deltas(torch.ones(2, 2), torch.ones(2, 3), "paper")


@pytest.mark.parametrize("convention", ["paper", "signed_magnitude", "no_scale"])
def test_rows_only_rescaled_have_no_direction_change_not_rounding_noise(convention):
    # magnitude-only DoRA: every row a positive multiple of W0's, so 1 - cos is 0 up to rounding; a
    # correlation must see 0, not ±1e-17 of noise
    generator = torch.Generator().manual_seed(3)
    w0 = torch.randn(64, 384, generator=generator)
    scale = 1 + 0.1 * torch.rand(64, 1, generator=generator)
    delta_magnitude, delta_direction = convention_deltas(w0, w0 * scale, convention)
    assert delta_direction == 0.0
    assert delta_magnitude != 0.0
    # a real turn far above the resolution is kept: one row rotated by 1e-4 rad
    turned = w0.double().clone()
    turned[0] += (
        1e-4
        * torch.linalg.vector_norm(turned[0])
        * torch.nn.functional.normalize(torch.randn(384, generator=generator, dtype=torch.float64), dim=0)
    )
    assert convention_deltas(w0.double(), turned, convention)[1] > 1e-12

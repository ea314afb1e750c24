"""Spectrum, intruder dimensions and φ against NumPy float64 SVDs, for dense, LoRA-factored and DoRA updates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dora_analysis.analysis.spectrum import (
    SUBSPACE_COLUMN,
    SpectrumOptions,
    factored_svd,
    intruder_count,
    randomized_svd,
    tensor_spectra,
    update_metrics,
    vector_errors,
)
from dora_analysis.readers.base import LowRankUpdate

RTOL = 1e-6


def _reference_metrics(delta: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """The five spectrum columns from NumPy's float64 SVD, written out from their definitions."""
    s = np.linalg.svd(delta, compute_uv=False)
    frob_sq = float(np.sum(delta**2))
    p = s[s > 0] / s.sum()
    energy = np.cumsum(s**2)
    return {
        "update_rel_norm": math.sqrt(frob_sq) / float(np.linalg.norm(base)),
        "update_stable_rank": frob_sq / s[0] ** 2,
        "update_effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
        "update_rank90": float(np.argmax(energy >= 0.9 * energy[-1]) + 1),
        "update_top_singular": float(s[0]),
    }


def _reference_intruders(w0: np.ndarray, wt: np.ndarray, k: int, eps: float) -> int:
    """Algorithm 1 of Shuttleworth et al.: top-k left singular vectors of W_t against all of W_0's."""
    u0 = np.linalg.svd(w0, full_matrices=False)[0]
    ut = np.linalg.svd(wt, full_matrices=False)[0]
    cosines = np.abs(ut[:, :k].T @ u0)
    return int(np.sum(cosines.max(axis=1) < eps))


def _reference_phi(d1: np.ndarray, d2: np.ndarray, i: int, j: int) -> float:
    u1 = np.linalg.svd(d1, full_matrices=False)[0][:, :i]
    u2 = np.linalg.svd(d2, full_matrices=False)[0][:, :j]
    return float(np.linalg.norm(u1.T @ u2) ** 2 / min(i, j))


def _close(ours: dict, reference: dict) -> None:
    for column, value in reference.items():
        assert ours[column] == pytest.approx(value, rel=RTOL, abs=1e-12), column


def _lora(out: int, features: int, r: int, seed: int, dora: bool = False, size: float = 0.3) -> LowRankUpdate:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, features, generator=g, dtype=torch.float64)
    b = size * torch.randn(out, r, generator=g, dtype=torch.float64)
    magnitude = (1 + 0.2 * torch.rand(out, generator=g, dtype=torch.float64)) if dora else None
    return LowRankUpdate("w", a, b, 0.5, magnitude)


def _dense_merge(w0: np.ndarray, update: LowRankUpdate) -> np.ndarray:
    v = w0 + update.scale * update.lora_B.numpy() @ update.lora_A.numpy()
    if update.magnitude is None:
        return v
    return update.magnitude.numpy()[:, None] * v / np.linalg.norm(v, axis=1)[:, None]


@pytest.fixture
def w0() -> torch.Tensor:
    return torch.randn(24, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_dense_update_of_random_and_known_rank(w0):
    g = torch.Generator().manual_seed(2)
    full = w0 + 0.1 * torch.randn(w0.shape, generator=g, dtype=torch.float64)
    rank3 = (
        w0 + torch.randn(24, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 40, generator=g).double()
    )
    records = tensor_spectra(w0, [lambda: full, lambda: rank3, lambda: w0.clone()], {"spectrum"})
    for record, tuned in zip(records, (full, rank3), strict=False):
        _close(record, _reference_metrics((tuned - w0).numpy(), w0.numpy()))
    assert records[1]["update_rank90"] <= 3 and records[1]["update_effective_rank"] < 3
    zero = records[2]  # an unchanged tensor
    assert (
        zero["update_rel_norm"] == 0 and zero["update_rank90"] == 0 and math.isnan(zero["update_stable_rank"])
    )


def test_lora_from_factors_equals_dense_and_numpy(w0):
    update = _lora(24, 40, 4, seed=3)
    merged = torch.from_numpy(_dense_merge(w0.numpy(), update))
    factored, dense = tensor_spectra(w0, [update, lambda: merged], {"spectrum", "intruders"})
    _close(factored, _reference_metrics(merged.numpy() - w0.numpy(), w0.numpy()))
    _close(factored, dense)  # the factored path equals the dense one
    assert factored["update_rank90"] <= 4
    u, sigma = factored_svd(update.lora_B, update.lora_A, update.scale)
    reference = np.linalg.svd(update.scale * update.lora_B.numpy() @ update.lora_A.numpy())
    np.testing.assert_allclose(sigma.numpy(), reference[1][:4], rtol=RTOL)
    np.testing.assert_allclose(np.abs(u.numpy().T @ reference[0][:, :4]), np.eye(4), atol=1e-9)


def test_dora_update_from_factors_equals_numpy(w0):
    update = _lora(24, 40, 4, seed=4, dora=True)
    merged = _dense_merge(w0.numpy(), update)
    (record,) = tensor_spectra(w0, [update], {"spectrum", "intruders"}, SpectrumOptions(intruder_k=6))
    _close(record, _reference_metrics(merged - w0.numpy(), w0.numpy()))
    assert record["update_rank90"] > 4  # the magnitude rescales every row of W0: not low rank
    assert record["intruder_dimensions"] == _reference_intruders(w0.numpy(), merged, 6, 0.5)


def test_a_planted_intruder_is_found_and_counted_as_numpy_does(w0):
    g = torch.Generator().manual_seed(5)
    sigma_max = float(torch.linalg.matrix_norm(w0, 2))
    u0 = torch.linalg.svd(w0)[0]  # (24, 24)
    signs = torch.where(torch.rand(24, 1, generator=g) < 0.5, -1.0, 1.0).double()
    u = u0 @ signs / math.sqrt(24)  # |cos| = 1/sqrt(24) with every left singular vector of W0
    v = torch.randn(1, 40, generator=g, dtype=torch.float64)
    planted = w0 + 3 * sigma_max * u @ (v / v.norm())  # a new top direction, σ above W0's largest
    aligned_u = u0[:, :1]  # the same size, along W0's own top direction
    aligned = w0 + 3 * sigma_max * aligned_u @ (v / v.norm())
    small = w0 + 0.01 * torch.randn(w0.shape, generator=g, dtype=torch.float64)
    for k, eps in ((10, 0.5), (4, 0.3)):
        records = tensor_spectra(
            w0,
            [lambda: planted, lambda: aligned, lambda: small],
            {"intruders"},
            SpectrumOptions(intruder_k=k, intruder_eps=eps),
        )
        counts = [r["intruder_dimensions"] for r in records]
        assert counts == [
            _reference_intruders(w0.numpy(), t.numpy(), k, eps) for t in (planted, aligned, small)
        ]
    # with the default k = 10, eps = 0.5: the planted direction is an intruder, the aligned one is not
    default = tensor_spectra(w0, [lambda: planted, lambda: aligned, lambda: small], {"intruders"})
    assert default[0]["intruder_dimensions"] == default[1]["intruder_dimensions"] + 1
    assert default[2]["intruder_dimensions"] == 0


def test_subspace_similarity_to_a_reference(w0):
    g = torch.Generator().manual_seed(6)
    updates = [_lora(24, 40, 8, seed=s) for s in (7, 8)]
    third = w0 + 0.2 * torch.randn(w0.shape, generator=g, dtype=torch.float64)
    merged = [torch.from_numpy(_dense_merge(w0.numpy(), u)) for u in updates]
    records = tensor_spectra(w0, [updates[0], updates[1], lambda: third], {"spectrum"}, references=[1, 1, 1])
    deltas = [m.numpy() - w0.numpy() for m in merged] + [third.numpy() - w0.numpy()]
    for record, delta in zip(records, deltas, strict=True):
        assert record[SUBSPACE_COLUMN] == pytest.approx(_reference_phi(delta, deltas[1], 8, 8), rel=RTOL)
    assert records[1][SUBSPACE_COLUMN] == pytest.approx(1.0)
    # a rank-2 update compares its 2 directions only (no null-space vectors), and a zero update gives NaN
    low = _lora(24, 40, 2, seed=9)
    zero = LowRankUpdate("w", low.lora_A, torch.zeros_like(low.lora_B), 0.5)
    records = tensor_spectra(w0, [low, updates[0], zero], set(), references=[1, None, 1])
    low_delta = _dense_merge(w0.numpy(), low) - w0.numpy()
    assert records[0][SUBSPACE_COLUMN] == pytest.approx(_reference_phi(low_delta, deltas[0], 2, 8), rel=RTOL)
    assert math.isnan(records[1][SUBSPACE_COLUMN]) and math.isnan(records[2][SUBSPACE_COLUMN])


def test_randomized_path_is_within_its_stated_error():
    g = torch.Generator().manual_seed(10)
    # a decaying spectrum: the top 20 values to 1e-6 relative after 4 power iterations
    u, _ = torch.linalg.qr(torch.randn(200, 150, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(150, 150, generator=g, dtype=torch.float64))
    sigma = 0.8 ** torch.arange(150, dtype=torch.float64)
    matrix = u @ torch.diag(sigma) @ v.T
    _, approx = randomized_svd(matrix, 20, power_iterations=4)
    assert torch.all(approx <= sigma[:20] * (1 + 1e-12))
    np.testing.assert_allclose(approx.numpy(), sigma[:20].numpy(), rtol=1e-6)
    base = torch.randn(200, 150, generator=g, dtype=torch.float64)
    exact, fast = (
        tensor_spectra(base, [lambda: base + matrix], {"spectrum"}, SpectrumOptions(svd_rank=q))[0]
        for q in (None, 40)
    )
    for column in ("update_rel_norm", "update_stable_rank", "update_rank90", "update_top_singular"):
        assert fast[column] == pytest.approx(exact[column], rel=1e-6), column
    assert math.isnan(fast["update_effective_rank"])  # needs the whole spectrum: not claimed


@pytest.mark.slow
def test_randomized_intruders_fall_back_to_the_exact_svd_on_a_flat_spectrum(monkeypatch):
    g = torch.Generator().manual_seed(11)
    # Gaussian weights: a flat top spectrum, where a randomised range finder's vectors are mixtures
    base = torch.randn(300, 240, generator=g, dtype=torch.float64)
    tuned = base + 0.01 * torch.randn(300, 240, generator=g, dtype=torch.float64)
    options = SpectrumOptions(svd_rank=10, power_iterations=2)
    raw_u, raw_sigma = randomized_svd(tuned, 10, power_iterations=2)
    expected = _reference_intruders(base.numpy(), tuned.numpy(), 10, 0.5)
    assert intruder_count(raw_u, torch.linalg.svd(base)[0], 0.5) != expected  # unchecked, they miscount
    exact_calls = _count_exact_svds(monkeypatch)
    record = tensor_spectra(base, [lambda: tuned], {"intruders"}, options)[0]
    assert record["intruder_dimensions"] == expected
    assert exact_calls.count((300, 240)) == 2  # the base's, and the fallback for the tuned weight

    # a planted low-rank update over the same base: clear gaps, the randomised count is certified
    u, _ = torch.linalg.qr(torch.randn(300, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(240, 6, generator=g, dtype=torch.float64))
    planted = base + u @ torch.diag(torch.tensor([400.0, 300, 220, 160, 120, 90], dtype=torch.float64)) @ v.T
    exact_calls.clear()
    record = tensor_spectra(
        base, [lambda: planted], {"intruders"}, SpectrumOptions(svd_rank=10, intruder_k=6)
    )[0]
    assert record["intruder_dimensions"] == _reference_intruders(base.numpy(), planted.numpy(), 6, 0.5) == 6
    assert exact_calls.count((300, 240)) == 1  # only the base's


def test_vector_errors_bound_the_true_angles():
    g = torch.Generator().manual_seed(12)
    u, _ = torch.linalg.qr(torch.randn(200, 150, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(150, 150, generator=g, dtype=torch.float64))
    matrix = u @ torch.diag(0.9 ** torch.arange(150, dtype=torch.float64)) @ v.T
    for iterations in (0, 1, 3):
        left, sigma = randomized_svd(matrix, 10, power_iterations=iterations)
        true_sin = torch.sqrt((1 - (left[:, :10] * u[:, :10]).sum(0).square()).clamp(min=0))
        assert torch.all(true_sin <= vector_errors(matrix, left, sigma, 10) + 1e-12), iterations


def _count_exact_svds(monkeypatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    svd = torch.linalg.svd

    def counted(matrix, *args, **kwargs):
        calls.append(tuple(matrix.shape))
        return svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counted)
    return calls


def test_update_metrics_rank90_beyond_a_partial_spectrum_is_unknown():
    record = update_metrics(torch.tensor([1.0, 1.0]), frob_sq=10.0, base_frob_sq=1.0, complete=False)
    assert math.isnan(record["update_rank90"]) and math.isnan(record["update_effective_rank"])
    assert record["update_stable_rank"] == 10.0

"""Per-tensor ΔM/ΔD from per-row sums in one compiled pass, for many small tensors at once.

:func:`~dora_analysis.analysis.decomposition.row_changes` and
:func:`~dora_analysis.analysis.decomposition.summary_columns` take about thirty whole-array torch
ops, each a pass over every row's float64 values: for thousands of small tensors (an MoE's experts)
those passes cost more than reading the weights. This module compiles (with Numba, cached on disk)
one loop per tensor that forms each row's magnitudes, ``|m - m0|`` and ``1 - cos`` with the same
float64 operations in the same order as ``row_changes`` (so every row's values are the same bits),
and sums them over the tensor's rows. Only the order of those sums differs from torch's, and it
is the same for a tensor alone or in a batch. Without Numba, :func:`available` is False and callers
keep the torch path.
"""

from __future__ import annotations

import functools

import numpy as np

from dora_analysis.analysis.fused_rows import available

__all__ = ["available", "tensor_sums"]


def tensor_sums(base_sq: np.ndarray, dot: np.ndarray, update_sq: np.ndarray) -> np.ndarray:
    """Per tensor (row of the inputs), what its summary needs.

    Args:
        base_sq, dot, update_sq: ``(N, k)`` float64, C-contiguous: ``|a|^2``, ``a.d``, ``|d|^2`` of
            the ``k`` rows of ``N`` tensors.
    Returns:
        ``(7, N)`` float64: whether every base norm is finite (1/0), whether every tuned norm is,
        the number of valid rows (both norms nonzero), the mean ``|m - m0|`` and the mean
        ``1 - cos`` over the valid rows (NaN with none), the mean base and tuned norms.
    """
    out = np.empty((7, base_sq.shape[0]))
    _kernel()(base_sq, dot, update_sq, out)
    return out


def _tensor_sums(base_sq, dot, update_sq, out):  # pragma: no cover - runs compiled
    """See :func:`tensor_sums`; each step as ``row_changes`` writes it (``where`` as a branch)."""
    n, k = base_sq.shape
    for i in range(n):
        base_finite = 1.0
        tuned_finite = 1.0
        n_valid = 0.0
        sum_magnitude = 0.0
        sum_direction = 0.0
        sum_base = 0.0
        sum_tuned = 0.0
        for j in range(k):
            b = base_sq[i, j]
            x = dot[i, j]
            r = update_sq[i, j]
            tuned_sq = b + 2 * x + r
            if tuned_sq < 0:  # clamp_min(0); NaN stays NaN, as in torch
                tuned_sq = 0.0
            base_norm = np.sqrt(b)
            tuned_norm = np.sqrt(tuned_sq)
            valid = b > 0 and tuned_sq > 0
            safe = base_norm * tuned_norm if valid else 1.0
            cos = (b + x) / safe
            if cos < -1:
                cos = -1.0
            elif cos > 1:
                cos = 1.0
            cross_sq = b * r - x * x
            if cross_sq < 0:
                cross_sq = 0.0
            one_minus_cos = cross_sq / (safe * safe * (1 + cos)) if cos > 0 else 1 - cos
            denominator = base_norm + tuned_norm if valid else 1.0
            magnitude_change = abs((2 * x + r) / denominator)
            if not np.isfinite(base_norm):
                base_finite = 0.0
            if not np.isfinite(tuned_norm):
                tuned_finite = 0.0
            if valid:
                n_valid += 1
                sum_magnitude += magnitude_change
                sum_direction += one_minus_cos
            sum_base += base_norm
            sum_tuned += tuned_norm
        out[0, i] = base_finite
        out[1, i] = tuned_finite
        out[2, i] = n_valid
        out[3, i] = sum_magnitude / n_valid if n_valid > 0 else np.nan
        out[4, i] = sum_direction / n_valid if n_valid > 0 else np.nan
        out[5, i] = sum_base / k
        out[6, i] = sum_tuned / k


@functools.cache
def _kernel():
    import numba

    # No fastmath: every step rounds as the torch path's does (no reassociation, no FMA).
    return numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")(_tensor_sums)

"""The correlation the paper reports (Section 3.2): how ΔM moves with ΔD, per method and module.

One point is one weight matrix at one training step, ``x = delta_direction``, ``y = delta_magnitude``.
The paper's numbers (FT -0.62, DoRA -0.31, LoRA +0.83) are read as Pearson r pooled over all points
of a panel (all layers and steps). Pooling mixes two things: layers that differ in both ΔD and ΔM, and
the joint movement over training. So each group also gets

- ``r_within_step``: Pearson r after centring x and y on their per-step means (the between-layer
  relation at a fixed point of training, pooled over steps);
- ``r_within_layer``: Pearson r after centring on per-layer means (how ΔM and ΔD move together over
  training inside one layer, pooled over layers).

Centring and pooling (rather than averaging per-group r) keeps every point and stays defined with
few points per group; with one group it equals the pooled r.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dora_analysis.schema import METHODS, points

__all__ = ["CORRELATION_COLUMNS", "pearson", "bootstrap_interval", "correlations"]

CORRELATION_COLUMNS = [
    "method",
    "module",
    "n",
    "steps",
    "layers",
    "r",
    "r_low",
    "r_high",
    "slope",
    "intercept",
    "r_within_step",
    "r_within_layer",
]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of two ``(n,)`` arrays in float64; NaN when n < 3 or either has no spread."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / denominator if denominator > 0 else math.nan


def bootstrap_interval(
    x: np.ndarray, y: np.ndarray, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of Pearson r, resampling ``(x, y)`` points with replacement.

    A fixed ``seed`` makes the interval reproducible. Resamples with no spread are dropped.
    Returns ``(nan, nan)`` for fewer than 3 points.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = x.size
    if n < 3:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(resamples, n))  # (B, n)
    xs, ys = x[index], y[index]
    xs = xs - xs.mean(axis=1, keepdims=True)
    ys = ys - ys.mean(axis=1, keepdims=True)
    denominator = np.sqrt((xs * xs).sum(axis=1) * (ys * ys).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xs * ys).sum(axis=1) / denominator
    r = r[np.isfinite(r)]
    if r.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(r, [tail, 100 - tail])
    return float(low), float(high)


def _centred(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``values`` minus the mean of its group; ``values`` and ``groups`` are ``(n,)``."""
    series = pd.Series(values)
    return (series - series.groupby(groups).transform("mean")).to_numpy()


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``y = slope * x + intercept``; NaN when x has no spread."""
    if x.size < 2:
        return math.nan, math.nan
    xc = x - x.mean()
    sxx = float(xc @ xc)
    if sxx == 0:
        return math.nan, math.nan
    slope = float(xc @ (y - y.mean())) / sxx
    return slope, float(y.mean() - slope * x.mean())


def correlations(df: pd.DataFrame, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per method and module: Pearson r of (ΔD, ΔM) pooled over layers and steps, and its companions.

    Args:
        df: the series (:func:`dora_analysis.analyze_series`): columns ``method``, ``module``,
            ``step``, ``layer``, ``delta_direction``, ``delta_magnitude``.
        resamples, level, seed: the percentile bootstrap of r (fixed seed: reproducible).
    Returns:
        One row per (method, module), columns :data:`CORRELATION_COLUMNS`: ``n`` points, the number
        of ``steps`` and ``layers``, pooled ``r`` with its interval ``[r_low, r_high]``, the
        least-squares ``slope``/``intercept`` of ΔM on ΔD, and ``r_within_step``/``r_within_layer``
        (see the module docstring). Methods in :data:`~dora_analysis.schema.METHODS` order, then others alphabetically.
    """
    data = points(df)
    rows = []
    for (method, module), group in data.groupby(["method", "module"], sort=False):
        x = group["delta_direction"].to_numpy(np.float64)
        y = group["delta_magnitude"].to_numpy(np.float64)
        low, high = bootstrap_interval(x, y, resamples=resamples, level=level, seed=seed)
        slope, intercept = _slope(x, y)
        steps = group["step"].astype("float64").fillna(-1).to_numpy()
        layers = group["layer"].astype("float64").fillna(-1).to_numpy()
        rows.append(
            {
                "method": method,
                "module": module,
                "n": int(x.size),
                "steps": int(pd.Series(steps).nunique()),
                "layers": int(pd.Series(layers).nunique()),
                "r": pearson(x, y),
                "r_low": low,
                "r_high": high,
                "slope": slope,
                "intercept": intercept,
                "r_within_step": pearson(_centred(x, steps), _centred(y, steps)),
                "r_within_layer": pearson(_centred(x, layers), _centred(y, layers)),
            }
        )
    result = pd.DataFrame(rows, columns=CORRELATION_COLUMNS)
    if result.empty:
        return result
    rank = {m: i for i, m in enumerate(METHODS)}
    key = result["method"].map(lambda m: (rank.get(str(m).lower(), len(rank)), str(m)))
    return (
        result.assign(_key=key)
        .sort_values(["_key", "module"], kind="stable")
        .drop(columns="_key")
        .reset_index(drop=True)
    )

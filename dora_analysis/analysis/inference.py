"""Intervals that follow a series' design: every seed shares the layers, steps within a layer are dependent.

The points of a panel are one weight matrix (a layer index) of one run (a seed) at one step. The seeds
of a method start from the same pre-trained model, so layer ``l`` is the same matrix in every seed,
and what makes layer ``l`` differ from layer ``l'`` is shared by all seeds; the steps of one matrix are
strongly autocorrelated. The independent units are the *layer indices*, with all of their seeds and
steps together: 3 seeds x 6 layers x 4 steps hold 6 units, not 18 (layers resampled within each run)
and not 72 (points). The seeds' own offsets (what a seed shifts in every layer alike) are taken as
given: with 3 seeds nothing can estimate them, so the interval speaks for these seeds' layers.

**The interval** is the delete-one-layer jackknife with Student's t: every statistic is recomputed
``L`` times, each time without one layer index (in every run at once); its standard error is
``sqrt((L-1)/L * sum((t_(l) - mean)^2))``; the interval is ``estimate ± t_{L-1} * se``, with the
correlations on Fisher's z scale (``atanh``, mapped back with ``tanh``, so it stays inside (-1, 1))
and the slope on its own scale. The ``L - 1`` degrees of freedom make a 6-layer interval as wide as
6 units warrant (``t_5 = 2.57``, not 1.96); a percentile bootstrap of 6 clusters is too narrow (see
``benchmarks/bench_coverage.py``). Below :data:`MIN_LAYERS` layers there is no interval.

Pure NumPy (and SciPy's t quantile): arrays in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "MIN_LAYERS",
    "WEIGHTED_STATISTICS",
    "STATISTICS",
    "Design",
    "design_codes",
    "weighted_statistics",
    "spearman_without_layers",
    "t_quantile",
    "jackknife_t_interval",
    "layer_jackknife",
    "stratified_cluster_counts",
    "percentile_interval",
]

#: Fewer layer indices than this: no interval. With 2 a deleted layer leaves one matrix, and t has
#: 1 degree of freedom; from 3 on the simulated coverage holds (0.95 at 3 x 3 x 4 with normal layer
#: effects, ``benchmarks/bench_coverage.py --designs 3x3x4``), the interval is only wide.
MIN_LAYERS = 3

#: The statistics :func:`weighted_statistics` computes for weighted copies of the points.
WEIGHTED_STATISTICS = ("r", "slope", "r_within_step", "r_within_layer")
#: Every statistic :func:`layer_jackknife` gives an interval for; correlations go through Fisher's z.
STATISTICS = ("r", "slope", "spearman", "r_within_step", "r_within_layer")
CORRELATIONS = frozenset({"r", "spearman", "r_within_step", "r_within_layer"})


@dataclass(frozen=True)
class Design:
    """Integer codes of each point's layer index, run and step: each ``(n,)``, codes from 0."""

    layer: np.ndarray
    run: np.ndarray
    step: np.ndarray

    @property
    def layers(self) -> int:
        return int(self.layer.max()) + 1 if self.layer.size else 0


def design_codes(layer: np.ndarray, run: np.ndarray, step: np.ndarray) -> Design:
    """The :class:`Design` of ``(n,)`` labels (any hashable values; layer ``l`` of every run is one code)."""
    codes = [pd.factorize(pd.Series(np.asarray(v, dtype=object)).astype(str))[0] for v in (layer, run, step)]
    return Design(*(np.asarray(c, dtype=np.int64) for c in codes))


def _group_codes(*codes: np.ndarray) -> tuple[np.ndarray, int]:
    """One ``(n,)`` code per combination of the given ``(n,)`` codes, and how many combinations."""
    joint, labels = pd.factorize(pd.MultiIndex.from_arrays(list(codes)))
    return np.asarray(joint, dtype=np.int64), len(labels)


def _centred_within(values: np.ndarray, codes: np.ndarray, groups: int) -> np.ndarray:
    """``(n,)`` values minus their group's (unweighted) mean."""
    means = np.bincount(codes, weights=values, minlength=groups) / np.bincount(codes, minlength=groups)
    return values - means[codes]


def _ratio(cov: np.ndarray, vx: np.ndarray, vy: np.ndarray | None = None) -> np.ndarray:
    """``cov / sqrt(vx * vy)`` (or ``cov / vx`` without ``vy``), NaN where a variance is not positive."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if vy is None:
            return np.where(vx > 0, cov / vx, np.nan)
        return np.where((vx > 0) & (vy > 0), cov / np.sqrt(vx * vy), np.nan)


def weighted_statistics(x: np.ndarray, y: np.ndarray, design: Design, weights: np.ndarray) -> dict:
    """Pooled r, slope of y on x, r within step and r within layer of weighted copies of the points.

    Args:
        x, y: ``(n,)`` points.
        design: their layer, run and step codes.
        weights: ``(B, n)`` how often each point counts in each copy; constant over the points of one
            (run, layer), as whole layers are dropped or drawn (a jackknife, a cluster bootstrap).
    Returns:
        ``{name: (B,) values}`` for :data:`WEIGHTED_STATISTICS`; NaN where a copy has no spread.
        ``r_within_step`` centres on each (run, step)'s weighted mean; ``r_within_layer`` on each
        (run, layer)'s mean, which whole-layer weights leave unchanged.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    xc, yc = x - x.mean(), y - y.mean()  # shift-invariant statistics; centring avoids cancellation
    n, sx, sy = w.sum(axis=1), w @ xc, w @ yc
    with np.errstate(invalid="ignore", divide="ignore"):
        cov, vx, vy = w @ (xc * yc) - sx * sy / n, w @ (xc * xc) - sx * sx / n, w @ (yc * yc) - sy * sy / n
    result = {"r": _ratio(cov, vx, vy), "slope": _ratio(cov, vx)}
    step_group, groups = _group_codes(design.run, design.step)
    onehot = np.zeros((x.size, groups))
    onehot[np.arange(x.size), step_group] = 1.0  # (n, G)
    gn, gx, gy = w @ onehot, w @ (onehot * xc[:, None]), w @ (onehot * yc[:, None])  # each (B, G)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = np.where(gn > 0, 1.0 / gn, 0.0)
    cov = w @ (xc * yc) - (gx * gy * inv).sum(axis=1)
    vx, vy = w @ (xc * xc) - (gx * gx * inv).sum(axis=1), w @ (yc * yc) - (gy * gy * inv).sum(axis=1)
    result["r_within_step"] = _ratio(cov, vx, vy)
    layer_group, groups = _group_codes(design.run, design.layer)
    xl, yl = _centred_within(x, layer_group, groups), _centred_within(y, layer_group, groups)
    result["r_within_layer"] = _ratio(w @ (xl * yl), w @ (xl * xl), w @ (yl * yl))
    return result


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of the average ranks of ``(n,)`` x and y; NaN below 3 points or without spread."""
    if x.size < 3:
        return math.nan
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    return float(_ratio(*_moments(rx, ry)))


def _moments(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xc, yc = x - x.mean(), y - y.mean()
    return np.asarray(xc @ yc), np.asarray(xc @ xc), np.asarray(yc @ yc)


def spearman_without_layers(x: np.ndarray, y: np.ndarray, design: Design) -> np.ndarray:
    """``(L,)`` Spearman's rank correlation of the points, each time without one layer index (re-ranked)."""
    kept = [design.layer != layer for layer in range(design.layers)]
    return np.array([_spearman(x[k], y[k]) for k in kept])


def t_quantile(level: float, df: int) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom (``t_5(0.95) = 2.571``)."""
    from scipy import stats  # deferred: only an interval needs it

    return float(stats.t.ppf((1 + level) / 2, df))


def jackknife_t_interval(
    estimate: float, replicates: np.ndarray, level: float = 0.95, fisher: bool = True
) -> tuple[float, float]:
    """``estimate ± t_{L-1} * se`` from the ``(L,)`` delete-one ``replicates``, on Fisher's z if ``fisher``.

    ``se = sqrt((L-1)/L * sum((h_(l) - mean h)^2))`` with ``h = atanh`` (``fisher``) or the identity.
    Returns ``(nan, nan)`` when a replicate or the estimate is not finite, or ``|r| = 1`` (no z).
    """
    replicates = np.asarray(replicates, dtype=np.float64)
    count = replicates.size
    if count < 2 or not (math.isfinite(estimate) and np.isfinite(replicates).all()):
        return math.nan, math.nan
    if fisher and (abs(estimate) >= 1 or (np.abs(replicates) >= 1).any()):
        return math.nan, math.nan
    forward, back = (np.arctanh, np.tanh) if fisher else (np.asarray, np.asarray)
    h = forward(replicates)
    se = math.sqrt((count - 1) / count * float(((h - h.mean()) ** 2).sum()))
    half = t_quantile(level, count - 1) * se
    centre = float(forward(estimate))
    return float(back(centre - half)), float(back(centre + half))


def layer_jackknife(
    x: np.ndarray,
    y: np.ndarray,
    design: Design,
    estimates: dict,
    level: float = 0.95,
    min_layers: int = MIN_LAYERS,
) -> tuple[dict, str | None]:
    """Delete-one-layer jackknife t intervals of :data:`STATISTICS` (see the module docstring).

    Args:
        x, y: ``(n,)`` points; design: their codes (a layer index is dropped from every run at once).
        estimates: ``{name: value}`` on all points for each of :data:`STATISTICS` (the centres).
        level: the coverage asked for; min_layers: fewer layer indices give no interval.
    Returns:
        ``({name: (low, high)}, note)``: NaN intervals where none can be given, and a note saying why
        (None when every interval exists).
    """
    layers = design.layers
    if layers < min_layers:
        nan = {name: (math.nan, math.nan) for name in STATISTICS}
        return nan, f"{layers} layer{'s' * (layers != 1)}: no interval below {min_layers} layers"
    keep = (design.layer[None, :] != np.arange(layers)[:, None]).astype(np.float64)  # (L, n)
    replicates = weighted_statistics(x, y, design, keep)
    replicates["spearman"] = spearman_without_layers(x, y, design)
    intervals, missing = {}, []
    for name in STATISTICS:
        estimate = float(estimates[name])
        intervals[name] = jackknife_t_interval(estimate, replicates[name], level, name in CORRELATIONS)
        if math.isnan(intervals[name][0]):
            missing.append(f"{name} {_why(estimate, replicates[name])}")
    return intervals, ("no interval for " + "; ".join(missing)) if missing else None


def _why(estimate: float, replicates: np.ndarray) -> str:
    if not math.isfinite(estimate):
        return "(not defined)"
    if abs(estimate) >= 1 or (np.abs(replicates) >= 1).any():
        return "(|r| = 1)"
    return "(not defined without some layer)"


def stratified_cluster_counts(
    strata_of_clusters: np.ndarray, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """``(B, C)`` how often each of ``C`` clusters is drawn: in every stratum, as many draws as it has
    clusters, uniformly with replacement (strata in order of first appearance in ``(C,)`` labels)."""
    strata_of_clusters = np.asarray(strata_of_clusters)
    clusters = strata_of_clusters.size
    counts = np.zeros((resamples, clusters))
    for stratum in dict.fromkeys(strata_of_clusters.tolist()):
        members = np.flatnonzero(strata_of_clusters == stratum)
        draws = rng.integers(0, members.size, size=(resamples, members.size))  # (B, C_s)
        rows = np.repeat(np.arange(resamples), members.size)
        np.add.at(counts, (rows, members[draws.ravel()]), 1.0)
    return counts


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of the finite ``(B,)`` values; NaN if none is finite."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)

"""The correlation the paper reports (Section 3.2): how ΔM moves with ΔD, per run, stack and module.

One point is one weight matrix at one training step, ``x = delta_direction``, ``y = delta_magnitude``.
The paper's numbers (FT -0.62, DoRA -0.31, LoRA +0.83) are read as Pearson r pooled over all points
of a panel (all layers and steps). Pooling mixes two things: layers that differ in both ΔD and ΔM, and
the joint movement over training. So each group also gets

- ``r_within_step``: Pearson r after centring x and y on their per-step means (the between-layer
  relation at a fixed point of training, pooled over steps);
- ``r_within_layer``: Pearson r after centring on per-layer means (how ΔM and ΔD move together over
  training inside one layer, pooled over layers);
- ``spearman``: Spearman's rank correlation of the pooled points (average ranks for ties, as
  :func:`scipy.stats.spearmanr`), which a few extreme layers cannot drive.

Centring and pooling (rather than averaging per-group r) keeps every point and stays defined with
few points per group; with one group it equals the pooled r.

**Groups.** A group is one run (a training output folder: one method, one seed), one ``stack``
(encoder, decoder, vision, ...; when the series has one) and one ``module``. Two runs of a method are
two rows unless ``pool_runs=True``; then their points are pooled, but the within-step and
within-layer centring is still done per run, so two seeds never become one cloud there.

**The interval** of ``r`` is a percentile *cluster* bootstrap over layers: a resample draws whole
layers (all the steps of one matrix together) with replacement, within each run, and recomputes r
on their points. The same matrix at successive steps is strongly dependent, so resampling points as
if independent (``bootstrap="points"``, kept for comparison) gives intervals that are too narrow.
With fewer than 3 layers per group the cluster interval is not defined (NaN).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dora_analysis.schema import METHODS, points

__all__ = [
    "CORRELATION_COLUMNS",
    "BOOTSTRAPS",
    "pearson",
    "spearman",
    "bootstrap_interval",
    "cluster_bootstrap_interval",
    "correlations",
]

CORRELATION_COLUMNS = [
    "method",
    "run",
    "stack",
    "module",
    "n",
    "runs",
    "steps",
    "layers",
    "r",
    "r_low",
    "r_high",
    "bootstrap",
    "spearman",
    "slope",
    "intercept",
    "r_within_step",
    "r_within_layer",
]

#: ``"layers"``: resample whole layers (the cluster bootstrap, default); ``"points"``: resample
#: points as if independent (too narrow; kept to show the difference).
BOOTSTRAPS = ("layers", "points")

# Label of a missing run/stack/layer inside the grouping (pandas drops NaN group keys).
_MISSING = "\x00missing"


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of two ``(n,)`` arrays in float64; NaN when n < 3 or either has no spread."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / denominator if denominator > 0 else math.nan


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of two ``(n,)`` arrays: Pearson r of their average ranks."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return pearson(pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy())


def _percentiles(r: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of the finite resampled r values ``(B,)``."""
    r = r[np.isfinite(r)]
    if r.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(r, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_interval(
    x: np.ndarray, y: np.ndarray, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of Pearson r, resampling ``(x, y)`` points with replacement.

    Treats the points as independent, which the points of a series are not (see
    :func:`cluster_bootstrap_interval`). A fixed ``seed`` makes the interval reproducible.
    Resamples with no spread are dropped. Returns ``(nan, nan)`` for fewer than 3 points.
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
    return _percentiles(r, level)


def cluster_bootstrap_interval(
    x: np.ndarray,
    y: np.ndarray,
    clusters: np.ndarray,
    strata: np.ndarray | None = None,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    min_clusters: int = 3,
) -> tuple[float, float]:
    """Percentile cluster-bootstrap interval of Pearson r: whole clusters are resampled.

    Each resample draws, in every stratum, as many clusters as the stratum has, uniformly with
    replacement, and computes r over all the points of the drawn clusters (a cluster drawn twice
    counts twice). For a series a cluster is a layer (its points at every step), a stratum a run.

    Args:
        x, y: ``(n,)`` points.
        clusters: ``(n,)`` cluster label of each point (any hashable values).
        strata: ``(n,)`` stratum label of each point (clusters are resampled within their
            stratum); None: one stratum.
        resamples, level, seed: ``resamples`` draws, the central ``level`` interval; a fixed seed
            makes it reproducible.
        min_clusters: fewer clusters in all than this gives ``(nan, nan)`` (one or two layers say
            nothing about the spread between layers).
    Returns:
        ``(low, high)``; resamples with no spread are dropped.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    strata = np.zeros(x.size) if strata is None else np.asarray(strata)
    keys = pd.MultiIndex.from_arrays([pd.Series(strata).astype(str), pd.Series(clusters).astype(str)])
    codes, labels = pd.factorize(keys)  # codes: (n,) cluster index; labels: (L,) (stratum, cluster)
    n_clusters = len(labels)
    if x.size < 3 or n_clusters < max(min_clusters, 1):
        return math.nan, math.nan
    # Per-cluster sums of the points centred on the overall mean (shift-invariant, no cancellation).
    xc, yc = x - x.mean(), y - y.mean()
    sums = np.zeros((n_clusters, 6))  # (L, [count, Σx, Σy, Σxx, Σyy, Σxy])
    for column, values in enumerate((np.ones_like(xc), xc, yc, xc * xc, yc * yc, xc * yc)):
        sums[:, column] = np.bincount(codes, weights=values, minlength=n_clusters)
    cluster_stratum = np.asarray([label[0] for label in labels])
    rng = np.random.default_rng(seed)
    counts = np.zeros((resamples, n_clusters))  # (B, L): how often each cluster is drawn
    for stratum in dict.fromkeys(cluster_stratum):
        members = np.flatnonzero(cluster_stratum == stratum)
        draws = rng.integers(0, members.size, size=(resamples, members.size))  # (B, L_s)
        rows = np.repeat(np.arange(resamples), members.size)
        np.add.at(counts, (rows, members[draws.ravel()]), 1.0)
    n, sx, sy, sxx, syy, sxy = (counts @ sums).T  # each (B,)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / n
        r = cov / np.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))
    return _percentiles(r, level)


def _centred(values: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """``values`` minus the mean of its group; ``values`` and each grouping array are ``(n,)``."""
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


def _labels(df: pd.DataFrame, column: str) -> pd.Series:
    """``df[column]`` as strings with a missing value (or a missing column) as :data:`_MISSING`."""
    if column not in df.columns:
        return pd.Series(_MISSING, index=df.index)
    values = df[column]
    return values.astype(object).where(values.notna(), _MISSING).astype(str)


def _shown(label: str) -> object:
    return None if label == _MISSING else label


def correlations(
    df: pd.DataFrame,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    pool_runs: bool = False,
    bootstrap: str = "layers",
) -> pd.DataFrame:
    """Per run (or method), stack and module: Pearson r of (ΔD, ΔM) over layers and steps, and companions.

    Args:
        df: the series (:func:`dora_analysis.analyze_series`): columns ``method``, ``module``,
            ``step``, ``layer``, ``delta_direction``, ``delta_magnitude``, and when present ``run``
            and ``stack`` (a missing or all-missing ``stack`` is one stack; without ``run`` each
            method is one run).
        resamples, level, seed: the percentile bootstrap of r (fixed seed: reproducible).
        pool_runs: False (default): one row per run. True: one row per method, pooling its runs'
            points (centring for ``r_within_step``/``r_within_layer`` still per run; the
            bootstrap resamples layers within each run).
        bootstrap: ``"layers"`` (default): the cluster bootstrap over whole layers (see the module
            docstring); ``"points"``: points resampled as if independent (too narrow; for comparison).
    Returns:
        One row per group, columns :data:`CORRELATION_COLUMNS`: ``run`` (the pooled runs joined by
        ``+`` with ``pool_runs``; None without a ``run`` column), ``stack`` (None for a series
        without stacks), ``n`` points, the number of ``runs``, ``steps`` and ``layers``, pooled
        ``r`` with its interval ``[r_low, r_high]`` from the ``bootstrap`` named in that column,
        ``spearman``, the least-squares ``slope``/``intercept`` of ΔM on ΔD, and
        ``r_within_step``/``r_within_layer``. Methods in :data:`~dora_analysis.schema.METHODS`
        order, then others alphabetically; then run, stack (in the series' order) and module.
    Raises:
        ValueError: an unknown ``bootstrap``.
    """
    if bootstrap not in BOOTSTRAPS:
        raise ValueError(f"bootstrap must be one of {BOOTSTRAPS}, got {bootstrap!r}")
    data = points(df)
    run = _labels(data, "run")
    stack = _labels(data, "stack")
    keys = ["method", "_stack", "module"] if pool_runs else ["method", "_run", "_stack", "module"]
    data = data.assign(_run=run, _stack=stack)
    rows = []
    for _, group in data.groupby(keys, sort=False):
        x = group["delta_direction"].to_numpy(np.float64)
        y = group["delta_magnitude"].to_numpy(np.float64)
        runs = group["_run"].to_numpy()
        # -1: no step / no layer (a lone checkpoint, a matrix outside the blocks), one group of its own
        steps = pd.to_numeric(group["step"]).astype("float64").fillna(-1).to_numpy()
        layers = pd.to_numeric(group["layer"]).astype("float64").fillna(-1).to_numpy()
        if bootstrap == "layers":
            low, high = cluster_bootstrap_interval(
                x, y, layers, strata=runs, resamples=resamples, level=level, seed=seed
            )
        else:
            low, high = bootstrap_interval(x, y, resamples=resamples, level=level, seed=seed)
        slope, intercept = _slope(x, y)
        run_labels = list(dict.fromkeys(runs))
        rows.append(
            {
                "method": group["method"].iloc[0],
                "run": _shown("+".join(run_labels)) if _MISSING not in run_labels else None,
                "stack": _shown(group["_stack"].iloc[0]),
                "module": group["module"].iloc[0],
                "n": int(x.size),
                "runs": len(run_labels),
                "steps": int(pd.Series(steps).nunique()),
                "layers": int(pd.Series(layers).nunique()),
                "r": pearson(x, y),
                "r_low": low,
                "r_high": high,
                "bootstrap": bootstrap,
                "spearman": spearman(x, y),
                "slope": slope,
                "intercept": intercept,
                "r_within_step": pearson(_centred(x, [runs, steps]), _centred(y, [runs, steps])),
                "r_within_layer": pearson(_centred(x, [runs, layers]), _centred(y, [runs, layers])),
            }
        )
    result = pd.DataFrame(rows, columns=CORRELATION_COLUMNS)
    if result.empty:
        return result
    rank = {m: i for i, m in enumerate(METHODS)}
    key = result["method"].map(lambda m: (rank.get(str(m).lower(), len(rank)), str(m)))
    stacks = {s: i for i, s in enumerate(dict.fromkeys(stack))}  # stacks in the series' order
    stack_key = result["stack"].map(lambda s: stacks[_MISSING if s is None else s])
    return (
        result.assign(_key=key, _run=result["run"].fillna(""), _stack=stack_key)
        .sort_values(["_key", "_run", "_stack", "module"], kind="stable")
        .drop(columns=["_key", "_run", "_stack"])
        .reset_index(drop=True)
    )

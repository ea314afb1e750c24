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

**The intervals** of ``r``, ``spearman``, ``slope``, ``r_within_step`` and ``r_within_layer`` are
delete-one-layer jackknife t intervals (:mod:`dora_analysis.analysis.inference`): a layer index is
the unit, dropped from every run at once, because the seeds of a method share their pre-trained
layers and the steps of one matrix are dependent; correlations on Fisher's z, ``L - 1`` degrees of
freedom. The earlier percentile bootstrap over layers resampled within each run counted 3 seeds x 6
layers as 18 independent clusters and covered about 70% in simulation
(``benchmarks/bench_coverage.py``); it stays callable as ``bootstrap="layers-within-run"`` for
comparison, as does ``bootstrap="points"``. Below :data:`~dora_analysis.analysis.inference.MIN_LAYERS`
layers there is no interval (NaN, and ``interval_note`` says why).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dora_analysis.analysis.inference import (
    MIN_LAYERS,
    STATISTICS,
    Design,
    design_codes,
    layer_jackknife,
    percentile_interval,
    stratified_cluster_counts,
    weighted_statistics,
)
from dora_analysis.schema import (
    CORRELATION_COLUMNS,
    INTERVAL,
    INTERVAL_COLUMNS,
    INTERVAL_NOTE,
    METHODS,
    points,
)

__all__ = [
    "BOOTSTRAPS",
    "DEFAULT_BOOTSTRAP",
    "pearson",
    "spearman",
    "bootstrap_interval",
    "cluster_bootstrap_interval",
    "interval_label",
    "correlations",
]

#: ``"layer-jackknife"`` (default): the delete-one-layer jackknife t interval, a layer index dropped
#: from every run at once (:mod:`dora_analysis.analysis.inference`). For comparison only:
#: ``"layers-within-run"``, the percentile bootstrap over layers resampled separately in each run
#: (the earlier default, ``"layers"`` is its old name: it counts 3 seeds x 6 layers as 18 independent
#: clusters, too narrow); ``"points"``, points resampled as if independent (narrower still; r only).
BOOTSTRAPS = ("layer-jackknife", "layers-within-run", "layers", "points")
DEFAULT_BOOTSTRAP = "layer-jackknife"

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
    return percentile_interval(r, level)


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
    counts = stratified_cluster_counts(cluster_stratum, resamples, np.random.default_rng(seed))  # (B, L)
    n, sx, sy, sxx, syy, sxy = (counts @ sums).T  # each (B,)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / n
        r = cov / np.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))
    return percentile_interval(r, level)


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


def interval_label(bootstrap: str, level: float, layers: int) -> str:
    """The ``interval`` column: which interval a row holds, in words (``"95% layer jackknife, t(5)"``)."""
    if bootstrap == DEFAULT_BOOTSTRAP:  # no degrees of freedom to name below 2 layers
        return f"{level:.0%} layer jackknife" + (f", t({layers - 1})" if layers >= 2 else "")
    if bootstrap == "points":
        return f"{level:.0%} percentile bootstrap, points as independent"
    return f"{level:.0%} percentile bootstrap, layers within each run"


def _estimates(x: np.ndarray, y: np.ndarray, runs: np.ndarray, steps: np.ndarray, layers: np.ndarray) -> dict:
    """Every statistic of one group's ``(n,)`` points on all of them (``intercept`` beside the slope)."""
    slope, intercept = _slope(x, y)
    return {
        "r": pearson(x, y),
        "spearman": spearman(x, y),
        "slope": slope,
        "intercept": intercept,
        "r_within_step": pearson(_centred(x, [runs, steps]), _centred(y, [runs, steps])),
        "r_within_layer": pearson(_centred(x, [runs, layers]), _centred(y, [runs, layers])),
    }


def _bootstrap_intervals(
    x: np.ndarray, y: np.ndarray, design: Design, bootstrap: str, resamples: int, level: float, seed: int
) -> tuple[dict, str | None]:
    """The old percentile intervals, for comparison: ``"layers-within-run"`` (every statistic but
    Spearman; the draws of :func:`cluster_bootstrap_interval`) or ``"points"`` (r only)."""
    nan = {name: (math.nan, math.nan) for name in STATISTICS}
    if bootstrap == "points":
        nan["r"] = bootstrap_interval(x, y, resamples=resamples, level=level, seed=seed)
        return nan, "bootstrap='points' gives an interval of r only"
    # clusters are (run, layer) pairs, resampled within their run, in the old function's order
    keys = pd.MultiIndex.from_arrays([design.run.astype(str), design.layer.astype(str)])
    codes, labels = pd.factorize(keys)
    if x.size < 3 or len(labels) < 3:
        return nan, "fewer than 3 layers in all: no interval"
    counts = stratified_cluster_counts(
        np.asarray([label[0] for label in labels]), resamples, np.random.default_rng(seed)
    )
    draws = weighted_statistics(x, y, design, counts[:, codes])
    intervals = {name: percentile_interval(draws[name], level) for name in draws}
    return {**nan, **intervals}, "spearman: no interval with bootstrap='layers-within-run'"


def _row(
    group: pd.DataFrame, bootstrap: str, resamples: int, level: float, seed: int, min_layers: int
) -> dict:
    """One row of :func:`correlations` from one group's points (columns ``_run`` and ``_stack`` added)."""
    x = group["delta_direction"].to_numpy(np.float64)
    y = group["delta_magnitude"].to_numpy(np.float64)
    runs = group["_run"].to_numpy()
    # -1: no step / no layer (a lone checkpoint, a matrix outside the blocks), one group of its own
    steps = pd.to_numeric(group["step"]).astype("float64").fillna(-1).to_numpy()
    layers = pd.to_numeric(group["layer"]).astype("float64").fillna(-1).to_numpy()
    design = design_codes(layers, runs, steps)
    estimates = _estimates(x, y, runs, steps, layers)
    if bootstrap == DEFAULT_BOOTSTRAP:
        intervals, note = layer_jackknife(x, y, design, estimates, level, min_layers)
    else:
        intervals, note = _bootstrap_intervals(x, y, design, bootstrap, resamples, level, seed)
    run_labels = list(dict.fromkeys(runs))
    row = {
        "method": group["method"].iloc[0],
        "run": _shown("+".join(run_labels)) if _MISSING not in run_labels else None,
        "stack": _shown(group["_stack"].iloc[0]),
        "module": group["module"].iloc[0],
        "n": int(x.size),
        "runs": len(run_labels),
        "steps": int(pd.Series(steps).nunique()),
        "layers": design.layers,
        "bootstrap": bootstrap,
        INTERVAL: interval_label(bootstrap, level, design.layers),
        INTERVAL_NOTE: note,
        **estimates,
    }
    for name, (low, high) in INTERVAL_COLUMNS.items():
        row[low], row[high] = intervals[name]
    return row


def correlations(
    df: pd.DataFrame,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    pool_runs: bool = False,
    bootstrap: str = DEFAULT_BOOTSTRAP,
    min_layers: int = MIN_LAYERS,
) -> pd.DataFrame:
    """Per run (or method), stack and module: Pearson r of (ΔD, ΔM) over layers and steps, and companions.

    Args:
        df: the series (:func:`dora_analysis.analyze_series`): columns ``method``, ``module``,
            ``step``, ``layer``, ``delta_direction``, ``delta_magnitude``, and when present ``run``
            and ``stack`` (a missing or all-missing ``stack`` is one stack; without ``run`` each
            method is one run).
        resamples, seed: the comparison bootstraps' draws (fixed seed: reproducible); the jackknife
            has no randomness. level: the intervals' coverage.
        pool_runs: False (default): one row per run. True: one row per method, pooling its runs'
            points (centring for ``r_within_step``/``r_within_layer`` still per run; the jackknife
            drops a layer index from every run at once, as the seeds share their layers).
        bootstrap: the interval, one of :data:`BOOTSTRAPS` (see there and the module docstring);
            the default ``"layer-jackknife"`` is the one to report.
        min_layers: fewer layer indices in a row give no jackknife interval (NaN and a note).
    Returns:
        One row per group, columns :data:`CORRELATION_COLUMNS`: ``run`` (the pooled runs joined by
        ``+`` with ``pool_runs``; None without a ``run`` column), ``stack`` (None for a series
        without stacks), ``n`` points, the number of ``runs``, ``steps`` and ``layers``; pooled
        ``r``, ``spearman``, the least-squares ``slope``/``intercept`` of ΔM on ΔD,
        ``r_within_step`` and ``r_within_layer``, each but the intercept with its interval
        (:data:`INTERVAL_COLUMNS`); ``bootstrap`` the method asked for, ``interval`` the
        intervals in words, ``interval_note`` why some are NaN. Methods in
        :data:`~dora_analysis.schema.METHODS` order, then others alphabetically; then run, stack
        (in the series' order) and module.
    Raises:
        ValueError: an unknown ``bootstrap``.
    """
    if bootstrap not in BOOTSTRAPS:
        raise ValueError(f"bootstrap must be one of {BOOTSTRAPS}, got {bootstrap!r}")
    bootstrap = "layers-within-run" if bootstrap == "layers" else bootstrap
    data = points(df)
    run = _labels(data, "run")
    stack = _labels(data, "stack")
    keys = ["method", "_stack", "module"] if pool_runs else ["method", "_run", "_stack", "module"]
    data = data.assign(_run=run, _stack=stack)
    options = {"bootstrap": bootstrap, "resamples": resamples, "level": level, "seed": seed}
    rows = [_row(group, min_layers=min_layers, **options) for _, group in data.groupby(keys, sort=False)]
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

"""correlations(): pooled, within-step and within-layer r, slope and bootstrap interval against SciPy/NumPy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from series_builders import synthetic_series

from dora_analysis.analysis.correlation import bootstrap_interval, correlations, pearson
from dora_analysis.schema import points


def test_pooled_r_and_slope_match_scipy_and_polyfit():
    df = synthetic_series()
    table = correlations(df)
    assert list(table["method"]) == ["ft", "ft", "lora", "lora", "dora", "dora"]
    for row in table.itertuples():
        group = df[(df.method == row.method) & (df.module == row.module)]
        x, y = group["delta_direction"].to_numpy(), group["delta_magnitude"].to_numpy()
        expected = stats.pearsonr(x, y)
        assert row.r == pytest.approx(expected.statistic, abs=1e-12)
        slope, intercept = np.polyfit(x, y, 1)
        assert row.slope == pytest.approx(slope, rel=1e-9)
        assert row.intercept == pytest.approx(intercept, rel=1e-9, abs=1e-12)
        assert row.n == 24 and row.steps == 4 and row.layers == 6
        assert row.r_low <= row.r <= row.r_high
    signs = table.groupby("method")["r"].max()
    assert signs["lora"] > 0.5 and table[table.method == "ft"]["r"].max() < 0


def test_within_step_and_within_layer_match_per_group_centring():
    df = synthetic_series(seed=3)
    table = correlations(df).set_index(["method", "module"])
    group = df[(df.method == "dora") & (df.module == "value")]
    for key, column in (("step", "r_within_step"), ("layer", "r_within_layer")):
        x = group["delta_direction"] - group.groupby(key)["delta_direction"].transform("mean")
        y = group["delta_magnitude"] - group.groupby(key)["delta_magnitude"].transform("mean")
        assert table.loc[("dora", "value"), column] == pytest.approx(
            stats.pearsonr(x, y).statistic, abs=1e-12
        )


def test_within_layer_removes_a_between_layer_relation():
    # Between layers ΔM rises with ΔD; inside each layer it falls over training: pooled r > 0,
    # within-layer r < 0. This is why the pooled value alone can mislead.
    rows = []
    for layer in range(6):
        for step in range(4):
            rows.append(
                {
                    "method": "lora",
                    "module": "query",
                    "layer": layer,
                    "step": step,
                    "delta_direction": layer + 0.1 * step,
                    "delta_magnitude": layer - 0.1 * step,
                }
            )
    table = correlations(pd.DataFrame(rows))
    assert table.loc[0, "r"] > 0.9
    assert table.loc[0, "r_within_layer"] == pytest.approx(-1.0)
    assert table.loc[0, "r_within_step"] == pytest.approx(1.0)


def test_bootstrap_interval_is_reproducible_and_matches_scipy_percentile():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    y = 0.5 * x + rng.normal(size=40)
    low, high = bootstrap_interval(x, y, resamples=2000, seed=7)
    assert (low, high) == bootstrap_interval(x, y, resamples=2000, seed=7)
    reference = stats.bootstrap(
        (x, y),
        lambda a, b: stats.pearsonr(a, b).statistic,
        paired=True,
        vectorized=False,
        n_resamples=2000,
        method="percentile",
        random_state=np.random.default_rng(11),
    ).confidence_interval
    # Different random draws: the two intervals agree to Monte-Carlo precision.
    assert low == pytest.approx(reference.low, abs=0.06)
    assert high == pytest.approx(reference.high, abs=0.06)
    assert low < stats.pearsonr(x, y).statistic < high


def test_degenerate_inputs_give_nan_not_errors():
    assert math.isnan(pearson(np.array([1.0, 2.0]), np.array([1.0, 3.0])))
    assert math.isnan(pearson(np.ones(5), np.arange(5.0)))
    assert all(math.isnan(v) for v in bootstrap_interval(np.ones(2), np.ones(2)))


def test_points_drop_unchanged_and_nonfinite_tensors():
    df = synthetic_series()
    extra = df.iloc[:3].copy()
    extra["delta_direction"] = [0.0, np.nan, 0.0]
    extra["delta_magnitude"] = [0.0, 1.0, 0.2]
    both = pd.concat([df, extra], ignore_index=True)
    assert len(points(both)) == len(df) + 1  # only the (0, 0.2) point stays
    table = correlations(both)
    assert table.loc[(table.method == "ft") & (table.module == "query"), "n"].item() == 25

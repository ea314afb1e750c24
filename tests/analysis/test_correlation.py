"""correlations(): pooled, within-step and within-layer r, Spearman, slope, per-run/stack grouping and the
cluster bootstrap, against SciPy/NumPy and a direct resampling loop."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from series_builders import bart_like_series, synthetic_series

from dora_analysis.analysis.correlation import (
    bootstrap_interval,
    cluster_bootstrap_interval,
    correlations,
    pearson,
)
from dora_analysis.schema import INTERVAL_COLUMNS, points


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
        assert row.r_low <= row.r <= row.r_high and row.bootstrap == "layer-jackknife"
        assert row.interval == "95% layer jackknife, t(5)" and row.interval_note is None
        assert row.spearman == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
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


def test_spearman_handles_ties_like_scipy():
    df = synthetic_series(seed=5)
    df["delta_direction"] = df["delta_direction"].round(3)  # many ties
    df["delta_magnitude"] = df["delta_magnitude"].round(2)
    for row in correlations(df).itertuples():
        group = df[(df.method == row.method) & (df.module == row.module)]
        expected = stats.spearmanr(group.delta_direction, group.delta_magnitude).statistic
        assert row.spearman == pytest.approx(expected, abs=1e-12)


def two_seeds() -> pd.DataFrame:
    """Two DoRA runs whose clouds are offset: within each run ΔM falls with ΔD, across runs it rises."""
    first = synthetic_series(seed=1, slopes={"dora": -1.0}).assign(run="dora-seed0")
    second = synthetic_series(seed=2, slopes={"dora": -1.0}).assign(run="dora-seed1")
    second["delta_direction"] += 0.05
    second["delta_magnitude"] += 0.5
    return pd.concat([first, second], ignore_index=True)


def test_runs_are_separate_rows_unless_pooled_and_centring_stays_per_run():
    df = two_seeds()
    table = correlations(df)
    assert list(table.run) == ["dora-seed0", "dora-seed0", "dora-seed1", "dora-seed1"]
    assert set(table.runs) == {1} and set(table.n) == {24}
    for row in table.itertuples():
        group = df[(df.run == row.run) & (df.module == row.module)]
        assert row.r == pytest.approx(stats.pearsonr(group.delta_direction, group.delta_magnitude)[0])

    pooled = correlations(df, pool_runs=True)
    assert list(pooled.run) == ["dora-seed0+dora-seed1"] * 2 and set(pooled.runs) == {2}
    query = df[df.module == "query"]
    row = pooled[pooled.module == "query"].iloc[0]
    assert row.n == 48 and row.layers == 6
    assert row.r == pytest.approx(stats.pearsonr(query.delta_direction, query.delta_magnitude)[0])
    assert row.r > 0.5  # the pooled cloud: the offset between seeds dominates
    for key, column in (("step", "r_within_step"), ("layer", "r_within_layer")):
        x = query.delta_direction - query.groupby(["run", key]).delta_direction.transform("mean")
        y = query.delta_magnitude - query.groupby(["run", key]).delta_magnitude.transform("mean")
        assert row[column] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        # centred on the (run, key) mean, not the key mean across seeds
        x_wrong = query.delta_direction - query.groupby(key).delta_direction.transform("mean")
        y_wrong = query.delta_magnitude - query.groupby(key).delta_magnitude.transform("mean")
        assert row[column] != pytest.approx(stats.pearsonr(x_wrong, y_wrong)[0], abs=1e-3)
    assert row.r_within_step < 0  # per run, the seeds' own (negative) relation shows


def test_stacks_are_separate_rows_and_a_missing_stack_is_one_stack():
    df = bart_like_series()
    table = correlations(df)
    assert len(table) == 3 * 3
    lora = table[table.method == "lora"]
    assert list(zip(lora["stack"], lora["module"], strict=True)) == [
        ("encoder", "self_attn.q_proj"),
        ("decoder", "encoder_attn.q_proj"),
        ("decoder", "self_attn.q_proj"),
    ]
    for row in table.itertuples():
        group = df[(df.method == row.method) & (df["stack"] == row.stack) & (df.module == row.module)]
        assert row.n == len(group) == 9 and row.run == f"{row.method}-run"
        assert row.r == pytest.approx(stats.pearsonr(group.delta_direction, group.delta_magnitude)[0])
    without = correlations(synthetic_series())
    assert without["stack"].isna().all() and without.run.isna().all()
    all_na = correlations(synthetic_series().assign(stack=pd.NA))
    pd.testing.assert_frame_equal(all_na, without)


def direct_cluster_bootstrap(df: pd.DataFrame, resamples: int, seed: int, level: float = 0.95):
    """A plain loop: per run, draw its layers with replacement, join their points, r with np.corrcoef."""
    rng = np.random.default_rng(seed)
    by_run = [
        [rows[["delta_direction", "delta_magnitude"]].to_numpy() for _, rows in group.groupby("layer")]
        for _, group in df.groupby("run")
    ]
    values = []
    for _ in range(resamples):
        drawn = [layers[i] for layers in by_run for i in rng.integers(0, len(layers), len(layers))]
        sample = np.concatenate(drawn)
        values.append(np.corrcoef(sample[:, 0], sample[:, 1])[0, 1])
    tail = (1 - level) / 2 * 100
    return np.percentile(values, [tail, 100 - tail])


def layered(runs=("a", "b"), layers: int = 8, steps: int = 8, seed: int = 0) -> pd.DataFrame:
    """Series whose layers barely move over steps: each layer is one random (ΔD, ΔM) point repeated
    at every step, so a run holds ``layers`` independent pieces of information, not layers x steps."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, run in enumerate(runs):
        base_x = rng.normal(size=layers)
        base_y = 0.5 * base_x + rng.normal(size=layers)
        rows += [
            {
                "method": "ft",
                "run": run,
                "module": "query",
                "layer": layer,
                "step": step,
                "delta_direction": 1 + 0.1 * base_x[layer] + 0.3 * k + 0.01 * rng.normal(),
                "delta_magnitude": 1 + 0.1 * base_y[layer] + 0.01 * rng.normal(),
            }
            for layer in range(layers)
            for step in range(steps)
        ]
    return pd.DataFrame(rows)


def test_cluster_bootstrap_is_reproducible_and_agrees_with_a_direct_loop():
    df = layered()
    x, y = df.delta_direction.to_numpy(), df.delta_magnitude.to_numpy()
    low, high = cluster_bootstrap_interval(x, y, df.layer, strata=df.run, resamples=3000, seed=4)
    assert (low, high) == cluster_bootstrap_interval(x, y, df.layer, strata=df.run, resamples=3000, seed=4)
    assert (low, high) != cluster_bootstrap_interval(x, y, df.layer, strata=df.run, resamples=3000, seed=5)
    reference_low, reference_high = direct_cluster_bootstrap(df, resamples=2000, seed=9)
    # independent draws: the intervals agree to Monte-Carlo precision ...
    assert low == pytest.approx(reference_low, abs=0.05)
    assert high == pytest.approx(reference_high, abs=0.05)
    # ... which is far tighter than the gap to the point bootstrap on these data
    points_low, points_high = bootstrap_interval(x, y, resamples=3000, seed=4)
    assert abs(points_low - reference_low) > 0.3 and abs(points_high - reference_high) > 0.2
    row = correlations(df, pool_runs=True, resamples=3000, seed=4, bootstrap="layers-within-run").iloc[0]
    # the same draws (the weighted path sums in another order: equal to rounding)
    assert (row.r_low, row.r_high) == pytest.approx((low, high), abs=1e-12)
    assert row.runs == 2 and row.n == 128 and row.bootstrap == "layers-within-run"
    old_name = correlations(df, pool_runs=True, resamples=3000, seed=4, bootstrap="layers").iloc[0]
    assert (old_name.r_low, old_name.r_high, old_name.bootstrap) == (row.r_low, row.r_high, row.bootstrap)


def test_cluster_interval_is_wider_when_layers_repeat_over_steps():
    # 8 layers of information, not 64 points: the point bootstrap believes 64, the layer bootstrap does not.
    df = layered(runs=("a",))
    layers = correlations(df, bootstrap="layers-within-run").iloc[0]
    points_table = correlations(df, bootstrap="points").iloc[0]
    assert points_table.bootstrap == "points" and layers.r == points_table.r
    assert layers.r_high - layers.r_low > 2 * (points_table.r_high - points_table.r_low)
    assert layers.r_low < layers.r < layers.r_high


def test_cluster_bootstrap_needs_three_layers_and_rejects_unknown_kinds():
    x, y = np.arange(8.0), np.arange(8.0) ** 2
    assert all(math.isnan(v) for v in cluster_bootstrap_interval(x, y, np.repeat([0, 1], 4)))
    assert all(np.isfinite(cluster_bootstrap_interval(x, y, np.repeat([0, 1, 2, 3], 2))))
    with pytest.raises(ValueError, match="bootstrap"):
        correlations(synthetic_series(), bootstrap="blocks")


def jackknife_reference(frame: pd.DataFrame, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """A plain loop: drop each layer index from every run, recompute with SciPy/NumPy, t on Fisher's z."""

    def centred_r(part, key):
        x = part.delta_direction - part.groupby(["run", key]).delta_direction.transform("mean")
        y = part.delta_magnitude - part.groupby(["run", key]).delta_magnitude.transform("mean")
        return stats.pearsonr(x, y).statistic

    def statistics(part):
        x, y = part.delta_direction, part.delta_magnitude
        return {
            "r": stats.pearsonr(x, y).statistic,
            "spearman": stats.spearmanr(x, y).statistic,
            "slope": np.polyfit(x, y, 1)[0],
            "r_within_step": centred_r(part, "step"),
            "r_within_layer": centred_r(part, "layer"),
        }

    full = statistics(frame)
    labels = frame.layer.unique()
    drops = [statistics(frame[frame.layer != layer]) for layer in labels]
    q = stats.t.ppf((1 + level) / 2, len(labels) - 1)
    result = {}
    for name, estimate in full.items():
        fisher = name != "slope"
        h = np.array([np.arctanh(d[name]) if fisher else d[name] for d in drops])
        se = math.sqrt((len(labels) - 1) / len(labels) * ((h - h.mean()) ** 2).sum())
        centre = np.arctanh(estimate) if fisher else estimate
        ends = (centre - q * se, centre + q * se)
        result[name] = tuple(np.tanh(ends)) if fisher else ends
    return result


def test_every_interval_is_the_layer_jackknife_across_pooled_runs():
    df = two_seeds()
    table = correlations(df, pool_runs=True, level=0.9)
    for row in table.itertuples():
        reference = jackknife_reference(df[df.module == row.module], level=0.9)
        for name, (low, high) in INTERVAL_COLUMNS.items():
            assert (getattr(row, low), getattr(row, high)) == pytest.approx(reference[name], abs=1e-9), name
            assert getattr(row, low) <= getattr(row, name) <= getattr(row, high)
        assert row.interval == "90% layer jackknife, t(5)" and row.interval_note is None


def test_no_interval_below_the_minimum_layers_and_a_note_says_why():
    table = correlations(bart_like_series(layers=2))
    interval_columns = [c for pair in INTERVAL_COLUMNS.values() for c in pair]
    assert table[interval_columns].isna().all().all()
    assert table.r.notna().all()
    assert (table.interval_note == "2 layers: no interval below 3 layers").all()
    one_layer = correlations(synthetic_series()[lambda f: f.layer == 0]).iloc[0]
    assert one_layer.interval == "95% layer jackknife" and one_layer.interval_note.startswith("1 layer:")
    # a lone checkpoint: r within a layer is not defined, nor its interval; the note names it
    one_step = synthetic_series()[lambda f: f.step == 10]
    row = correlations(one_step).iloc[0]
    assert math.isnan(row.r_within_layer) and math.isnan(row.r_within_layer_low)
    assert "r_within_layer" in row.interval_note and not math.isnan(row.r_low)


def test_the_comparison_bootstraps_say_which_intervals_they_lack():
    df = two_seeds()
    old = correlations(df, pool_runs=True, bootstrap="layers-within-run").iloc[0]
    assert old.interval == "95% percentile bootstrap, layers within each run"
    assert math.isnan(old.spearman_low) and "spearman" in old.interval_note
    assert old.slope_low < old.slope < old.slope_high
    points_row = correlations(df, bootstrap="points").iloc[0]
    assert math.isnan(points_row.slope_low) and "r only" in points_row.interval_note

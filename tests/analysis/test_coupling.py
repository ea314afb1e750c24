"""analysis/coupling.py: increments, relative ΔM and the row-by-row coupling, against NumPy/SciPy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dora_analysis.analysis.correlation import correlations
from dora_analysis.analysis.coupling import (
    increments,
    relative_to_base,
    row_coupling,
    row_coupling_summary,
)
from dora_analysis.schema import ROW_COUPLING_COLUMNS


def _series(seed: int = 0, runs=("a", "b"), layers: int = 4, steps=(10, 20, 30)) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for run in runs:
        for layer in range(layers):
            dm = dd = 0.0
            for step in steps:
                dm, dd = dm + rng.uniform(0.01, 0.1), dd + rng.uniform(0.001, 0.01)
                rows.append(
                    {
                        "run": run,
                        "method": "dora",
                        "step": step,
                        "stack": "encoder",
                        "layer": layer,
                        "module": "query",
                        "tensor": f"encoder.layer.{layer}.query.weight",
                        "delta_magnitude": dm,
                        "delta_direction": dd,
                        "base_magnitude_mean": 1.0 + layer,
                    }
                )
    frame = pd.DataFrame(rows)
    frame["step"] = frame["step"].astype("Int64")
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def test_increments_are_the_differences_between_consecutive_checkpoints():
    series = _series()
    got = increments(series)
    assert len(got) == len(series) - 2 * 4  # each (run, tensor) loses its first checkpoint
    for (run, tensor), part in series.groupby(["run", "tensor"]):
        part = part.sort_values("step")
        mine = got[(got.run == run) & (got.tensor == tensor)].sort_values("step")
        np.testing.assert_allclose(mine["delta_magnitude"], np.diff(part["delta_magnitude"]), rtol=1e-12)
        np.testing.assert_allclose(mine["delta_direction"], np.diff(part["delta_direction"]), rtol=1e-12)
        assert mine["step_from"].tolist() == part["step"].tolist()[:-1]
    table = correlations(got, pool_runs=True)  # the correlation table takes it unchanged
    assert len(table) == 1 and np.isfinite(table["r"].iloc[0])


def test_relative_to_base_divides_by_the_base_magnitude():
    series = _series()
    got = relative_to_base(series)
    np.testing.assert_allclose(
        got["delta_magnitude"], series["delta_magnitude"] / series["base_magnitude_mean"]
    )
    zero = relative_to_base(series.assign(base_magnitude_mean=0.0))
    assert zero["delta_magnitude"].isna().all()


def _per_row(seed: int = 1, runs=("a", "b", "c"), layers: int = 5, rows: int = 16) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for run in runs:
        for layer in range(layers):
            base = rng.uniform(0.5, 1.5, rows)
            tuned = base + rng.normal(0, 0.05, rows)
            direction = np.abs(rng.normal(0, 0.01, rows)) + 0.2 * np.abs(tuned - base)
            direction[0] = np.nan if layer == 0 else direction[0]  # a zero row has no direction
            parts.append(
                pd.DataFrame(
                    {
                        "run": run,
                        "method": "dora",
                        "step": 10,
                        "stack": "encoder",
                        "layer": layer,
                        "module": "query",
                        "tensor": f"encoder.layer.{layer}.query.weight",
                        "row": range(rows),
                        "base_magnitude": base,
                        "tuned_magnitude": tuned,
                        "delta_magnitude": np.abs(tuned - base),
                        "delta_direction": direction,
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


def test_row_coupling_matches_numpy_and_scipy_per_matrix():
    per_row = _per_row()
    got = row_coupling(per_row)
    assert list(got.columns) == ROW_COUPLING_COLUMNS and len(got) == 3 * 5
    for row in got.itertuples():
        part = per_row[(per_row.run == row.run) & (per_row.tensor == row.tensor)]
        part = part[np.isfinite(part.delta_direction)]
        signed = part.tuned_magnitude - part.base_magnitude
        assert row.rows == len(part)
        assert row.r_abs == pytest.approx(
            np.corrcoef(part.delta_magnitude, part.delta_direction)[0, 1], rel=1e-12
        )
        assert row.r_signed == pytest.approx(np.corrcoef(signed, part.delta_direction)[0, 1], rel=1e-12)
        assert row.spearman_abs == pytest.approx(
            stats.spearmanr(part.delta_magnitude, part.delta_direction)[0]
        )


def test_row_coupling_summary_pools_on_fisher_z_with_a_layer_jackknife():
    coupling = row_coupling(_per_row())
    summary = row_coupling_summary(coupling)
    assert len(summary) == 1
    row = summary.iloc[0]
    z = np.arctanh(coupling["r_abs"].to_numpy())
    layers = coupling["layer"].to_numpy()
    assert row["r_abs"] == pytest.approx(np.tanh(z.mean()), rel=1e-12)
    # the jackknife by hand: each layer left out of every run, se on z, t with L - 1 = 4 df
    replicates = np.array([z[layers != layer].mean() for layer in range(5)])
    se = np.sqrt(4 / 5 * ((replicates - replicates.mean()) ** 2).sum())
    half = stats.t.ppf(0.975, 4) * se
    assert row["r_abs_low"] == pytest.approx(np.tanh(z.mean() - half), rel=1e-9)
    assert row["r_abs_high"] == pytest.approx(np.tanh(z.mean() + half), rel=1e-9)
    assert row["interval"] == "95% layer jackknife, t(4)" and row["interval_note"] is None
    few = row_coupling_summary(coupling[coupling.layer < 2])
    assert np.isnan(few["r_abs_low"].iloc[0]) and "no interval below 3" in few["interval_note"].iloc[0]

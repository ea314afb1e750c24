"""The trajectory figure draws each layer's (ΔD, ΔM) points in step order, one panel per run."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from dora_analysis.errors import InputError
from dora_analysis.views.trajectories import trajectories_figure, write_trajectories


def frame() -> pd.DataFrame:
    """Two runs, three layers, five steps given out of order; one NaN row (a zero weight)."""
    rng = np.random.default_rng(0)
    rows = []
    for method in ("dora", "ft"):
        for step in (20, 0, 10, 40, 30):
            for layer in range(3):
                for module in ("attention.self.query", "attention.self.value"):
                    rows.append(
                        dict(run=method, method=method, step=step, stack="encoder", layer=layer, module=module,
                             delta_direction=rng.random() * 1e-3, delta_magnitude=rng.random() * 1e-2)
                    )  # fmt: skip
    df = pd.DataFrame(rows).astype({"step": "Int64", "layer": "Int64"})
    df.loc[0, "delta_magnitude"] = np.nan
    return df


def test_each_layer_is_one_line_through_its_steps_in_order():
    df = frame()
    fig = trajectories_figure(df, "query")
    axes = fig.axes
    assert [ax.get_title().split("\n")[0] for ax in axes] == [
        "FT (ft)",
        "DoRA (dora)",
    ]  # methods in the paper's order
    for ax, method in zip(axes, ("ft", "dora"), strict=True):
        lines = ax.get_lines()
        assert len(lines) == 3  # one per layer
        for layer, line in enumerate(lines):
            rows = df[(df.method == method) & (df.layer == layer) & df.module.str.endswith("query")]
            rows = rows[np.isfinite(rows.delta_magnitude)].sort_values("step")
            np.testing.assert_array_equal(line.get_xdata(), rows.delta_direction.to_numpy())
            np.testing.assert_array_equal(line.get_ydata(), rows.delta_magnitude.to_numpy())
    assert len(axes[1].get_lines()[0].get_xdata()) == 4  # the NaN point (dora, layer 0) left out


def test_unknown_module_and_existing_files_are_refused(tmp_path):
    with pytest.raises(InputError, match="no tracked rows"):
        trajectories_figure(frame(), "key")
    written = write_trajectories(frame(), tmp_path, formats=("png",))
    assert sorted(written) == ["trajectories_query", "trajectories_value"]
    with pytest.raises(InputError, match="already exists"):
        write_trajectories(frame(), tmp_path, formats=("png",))

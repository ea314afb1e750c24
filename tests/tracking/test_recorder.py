"""``train --track-every N``: RUN_DIR/deltas.csv from the live model equals the analysis of the
checkpoints the same run saved, and ``correlations`` reads it as it reads a series."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from tiny_models import save_tiny_encoder

import dora_analysis
from dora_analysis.commands.main import main

CLI = [
    "--steps", "4", "--save-every", "2", "--track-every", "2", "--batch-size", "4",
    "--max-train-examples", "16", "--max-eval-examples", "8", "--threads", "1", "--quiet",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ft", "dora"])
def test_track_every_writes_the_rows_of_the_saved_checkpoints(method, tmp_path):
    model = save_tiny_encoder(tmp_path / "tiny")
    out = tmp_path / "run"
    assert main(["train", "--method", method, "--model", str(model), "--out", str(out), *CLI]) == 0
    deltas = dora_analysis.read_tracked(out / "deltas.csv")
    assert sorted(set(deltas["step"])) == [0, 2, 4] and set(deltas["method"]) == {method}
    series = dora_analysis.analyze_series(None, out)  # the saved checkpoints, from the files
    for step in (2, 4):
        live = deltas[deltas.step == step].reset_index(drop=True)
        saved = series[series.step == step].reset_index(drop=True)
        assert list(live["tensor"]) == list(saved["tensor"]) and len(live) > 0
        for column in ("delta_magnitude", "delta_direction"):
            np.testing.assert_allclose(live[column], saved[column], rtol=1e-6, atol=0, err_msg=column)
    # correlations takes the tracked frame unchanged, and agrees with the checkpoints' series on the
    # same steps (r is computed from the same points)
    tracked = dora_analysis.correlations(deltas[deltas.step > 0], resamples=50)
    from_files = dora_analysis.correlations(series.assign(run=deltas["run"].iloc[0]), resamples=50)
    pd.testing.assert_series_equal(tracked["n"], from_files["n"])
    np.testing.assert_allclose(tracked["r"], from_files["r"], rtol=1e-6)
    # the figures command reads the tracked frame as well: the paper's figures and the trajectories
    figures = tmp_path / "figures"
    assert main(["figures", str(out / "deltas.csv"), "--out", str(figures), "--formats", "png"]) == 0
    names = {p.name for p in figures.iterdir()}
    assert {"trajectories_query.png", "trajectories_value.png", "direction_magnitude_query.png"} <= names


def test_track_every_must_be_positive(tmp_path, capsys):
    code = main(["train", "--method", "ft", "--out", str(tmp_path / "r"), "--track-every", "0"])
    assert code == 2

"""`python -m dora_analysis series` end to end: the CSV it writes and no overwriting."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from series_builders import STEPS, make_runs


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("series"))


@pytest.mark.slow
def test_series_cli_csv_and_refuses_to_overwrite(tiny_runs, tmp_path):
    base_dir, runs, _ = tiny_runs
    out = tmp_path / "series.csv"
    command = [
        sys.executable,
        "-m",
        "dora_analysis",
        "series",
        str(base_dir),
        str(runs["lora"]),
        str(runs["dora"]),
        "--format",
        "csv",
        "--output",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    frame = pd.read_csv(out)
    assert set(frame.method) == {"lora", "dora"} and len(frame) == 2 * len(STEPS) * 4
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_series_cli_per_row(tiny_runs, tmp_path, capsys):
    """--per-row: one row per output unit of every tensor at every checkpoint; refused with --cluster."""
    from dora_analysis.commands.main import main
    from dora_analysis.schema import SERIES_PER_ROW_COLUMNS

    base_dir, runs, _ = tiny_runs
    out = tmp_path / "rows.csv"
    assert main(["series", str(base_dir), str(runs["dora"]), "--per-row", "--output", str(out)]) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == SERIES_PER_ROW_COLUMNS
    per_tensor = frame.groupby(["step", "tensor"]).size()
    assert len(per_tensor) == len(STEPS) * 4 and (per_tensor == frame["row"].max() + 1).all()
    assert "output-unit rows" in capsys.readouterr().err
    code = main(["series", str(base_dir), str(runs["dora"]), "--per-row", "--cluster", "local"])
    assert code == 2 and "--per-row" in capsys.readouterr().err

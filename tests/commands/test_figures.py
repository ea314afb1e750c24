"""`python -m dora_analysis figures` end to end: the files it draws, the table it prints, no overwriting."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_figures_cli_draws_runs_and_prints_the_table(tmp_path):
    import subprocess
    import sys

    from series_builders import make_runs

    _, runs, _ = make_runs(tmp_path, methods=("lora", "dora"), steps=(10, 20))
    out = tmp_path / "figs"
    command = [
        sys.executable,
        "-m",
        "dora_analysis",
        "figures",
        str(runs["lora"]),
        str(runs["dora"]),
        "--out",
        str(out),
        "--formats",
        "png",
        "--modules",
        "value",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "direction_magnitude_value.png",
        "final_layers_value.png",
        "training_curves.png",
    ]
    assert "r_within_layer" in done.stdout and "dora" in done.stdout
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr

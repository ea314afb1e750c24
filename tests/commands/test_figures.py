"""`python -m dora_analysis figures` end to end: the files it draws, the table it prints, no overwriting,
and its inputs: run folders, or tracked frames (deltas.csv / .parquet), not both."""

from __future__ import annotations

import pytest

from dora_analysis.commands.main import main


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


def test_tracked_frames_and_run_folders_are_not_mixed(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "deltas.csv").write_text("run,step\n")
    code = main(
        ["figures", str(tmp_path / "deltas.csv"), str(tmp_path / "run"), "--out", str(tmp_path / "f")]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "deltas.csv" in error and "not both" in error and len(error.strip().splitlines()) == 1


def test_a_tracked_frame_without_the_series_columns_is_refused(tmp_path, capsys):
    (tmp_path / "deltas.csv").write_text("run,step\nr,0\n")
    assert main(["figures", str(tmp_path / "deltas.csv"), "--out", str(tmp_path / "f")]) == 2
    assert "not a tracked frame" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()

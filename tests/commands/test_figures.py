"""The figures command's inputs: run folders, or tracked frames (deltas.csv / .parquet), not both."""

from __future__ import annotations

from dora_analysis.commands.main import main


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

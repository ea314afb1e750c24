"""study --quick on a tiny encoder: the grid is trained, measured every way, summarised; runs are reused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
from tiny_models import save_tiny_encoder

from dora_analysis.analysis.conventions import convention_deltas
from dora_analysis.commands.main import main
from dora_analysis.factors import merge_low_rank
from dora_analysis.readers import open_checkpoint


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study")
    model = save_tiny_encoder(root / "tiny")
    out = root / "study"
    assert (
        main(["study", "--quick", "--out", str(out), "--model", str(model), "--quiet", "--threads", "1"]) == 0
    )
    return out


@pytest.mark.slow
def test_quick_study_writes_the_table_figures_and_report(quick_study):
    table = pd.read_csv(quick_study / "study.csv")
    assert set(table["method"]) == {"ft", "lora", "dora"}
    assert set(table["convention"]) == {"paper", "column_cosine", "signed_magnitude", "no_scale"}
    assert set(table["module"]) == {"query", "value"}
    base = table[table["cell"] == "base"]
    assert set(base["window"]) == {"paper", "early", "late"}
    assert set(table[table["cell"] != "base"]["window"]) == {"paper"}
    assert (table["seeds"] == 2).all()
    assert (table["r_seed_min"] <= table["r_seed_max"] + 1e-12).all()
    assert table["accuracy"].between(0, 1).all()
    assert (quick_study / "figures" / "sign_map_query.png").stat().st_size > 10_000
    report = (quick_study / "report.md").read_text()
    assert "## query: the paper's convention" in report and "sign_map_query.png" in report


@pytest.mark.slow
def test_every_convention_is_measured_on_the_same_merged_weights(quick_study):
    points = pd.read_csv(quick_study / "points.csv")
    paper = points[points["convention"] == "paper"].set_index(["run", "step", "tensor"])
    for convention in ("column_cosine", "signed_magnitude", "no_scale"):
        other = points[points["convention"] == convention].set_index(["run", "step", "tensor"])
        assert sorted(other.index) == sorted(paper.index)
    # An independent recomputation of a few points: the toolkit's own path (paper) and the
    # conventions module (every other) read the same checkpoint.
    checked = 0
    for row in points.groupby("convention").head(3).itertuples(index=False):
        base = json.loads((Path(row.checkpoint).parent / "run.json").read_text())["base_model"]
        with open_checkpoint(base) as b, open_checkpoint(Path(row.checkpoint), base=b) as tuned:
            name = next(n for n in tuned.names() if n.endswith(row.tensor))
            w0, w, update = b.get(row.tensor), tuned.get(name), tuned.low_rank(name)
            if row.convention == "no_scale" and update is not None:
                w = merge_low_rank(w0, dataclasses.replace(update, scale=1.0))
            expected = convention_deltas(w0, w, "paper" if row.convention == "no_scale" else row.convention)
        assert (row.delta_magnitude, row.delta_direction) == pytest.approx(expected, rel=1e-6, abs=1e-12)
        checked += 1
    assert checked == 12
    # FT has no scale to drop; LoRA merged without alpha/r = 16/8 = 2 moves half as far.
    ft = points[points["method"] == "ft"].pivot_table(
        index=["run", "step", "tensor"], columns="convention", values="delta_direction"
    )
    assert ft["no_scale"].to_numpy() == pytest.approx(ft["paper"].to_numpy(), rel=1e-6)
    lora = points[(points["method"] == "lora") & (points["delta_direction"] > 0)]
    lora = lora.pivot_table(index=["run", "step", "tensor"], columns="convention", values="delta_direction")
    assert (lora["no_scale"] < lora["paper"]).mean() > 0.9


@pytest.mark.slow
def test_a_second_study_reuses_the_runs_and_refuses_to_overwrite_results(quick_study, capsys):
    model = str(quick_study.parent / "tiny")
    args = ["study", "--quick", "--out", str(quick_study), "--model", model, "--quiet"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    stamps = {p: p.stat().st_mtime_ns for p in (quick_study / "runs").rglob("run.json")}
    assert main([*args, "--overwrite"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (quick_study / "runs").rglob("run.json")} == stamps


def test_quick_study_reports_increments_rows_and_every_interval(quick_study):
    """Issue 22's columns: r of the step-to-step increments and the row-by-row r within each matrix, each
    with its interval; every statistic's interval and what it is; the DoRA-only arm trains DoRA alone."""
    table = pd.read_csv(quick_study / "study.csv")
    for column in (
        "r_increments",
        "r_relative",
        "r_rows_abs",
        "r_rows_signed",
        "spearman",
        "slope",
        "r_within_step",
    ):
        assert {column, f"{column}_low", f"{column}_high"} <= set(table.columns), column
    assert table["interval"].str.contains("layer jackknife").all()
    paper = table[table["convention"] == "paper"]
    assert paper["r_rows_abs"].between(-1, 1).all() and paper["r_increments"].between(-1, 1).all()
    assert table["r_relative"].between(-1, 1).all()
    assert table.loc[table["convention"] != "paper", "r_rows_abs"].isna().all()  # rows: paper convention only
    assert set(table[table["cell"] == "wd-0.1-not-m"]["method"]) == {"dora"}
    coupling = pd.read_csv(quick_study / "row_coupling.csv")
    assert {"cell", "seed", "run", "step", "tensor", "rows", "r_abs", "r_signed"} <= set(coupling.columns)
    assert (coupling["rows"] > 2).all() and coupling["r_abs"].between(-1, 1).all()
    # the per-row view over the steps: every cell's checkpoints, pooled, and a figure of it per cell
    steps = pd.read_csv(quick_study / "row_coupling_steps.csv")
    assert set(steps["cell"]) == set(table["cell"]) and set(steps["step"]) == {2, 4, 6, 8}
    for cell in set(table["cell"]):
        assert (quick_study / "figures" / f"row_coupling_{cell}.png").stat().st_size > 10_000
    assert "row_coupling_base.png" in (quick_study / "report.md").read_text()


def test_the_full_plan_isolates_each_factor():
    from dora_analysis.jobs.study import study_plan

    plan = study_plan()
    cells = {c.name: c for c in plan.cells}
    longer = cells["constant-x6"]
    assert longer.steps == 6 * plan.steps and longer.overrides == {"schedule": "constant"}
    assert longer.window[-1] == longer.steps and longer.steps % longer.save_every == 0
    assert cells["wd-0.1-not-m"].overrides == {"weight_decay": 0.1, "decay_magnitude": False}
    for name in ("wd-0.1-not-m", "no-detach", "magnitude-only"):
        assert cells[name].methods == ("dora",)
    assert cells["no-detach"].overrides == {"detach_norm": False}
    assert cells["magnitude-only"].overrides == {"magnitude_only": True}


def test_every_study_run_records_its_dense_trajectory(quick_study):
    """Each run's live ΔM/ΔD between checkpoints (deltas.csv), equal to the checkpoints' at saved steps."""
    points = pd.read_csv(quick_study / "points.csv")
    paper = points[points["convention"] == "paper"]
    for run, part in paper.groupby("checkpoint"):
        folder = Path(run).parent
        tracked = pd.read_csv(folder / "deltas.csv")
        assert set(tracked["step"]) == {
            0,
            *range(1, 9),
        }  # every step of the quick runs (8 steps, every 2 // 4 -> 1)
        step = int(part["step"].iloc[0])
        at = tracked[tracked["step"] == step].set_index("tensor")
        for row in part.itertuples(index=False):
            assert at.loc[row.tensor, "delta_magnitude"] == pytest.approx(
                row.delta_magnitude, rel=1e-6, abs=1e-12
            )
        break  # one checkpoint of one run is enough here; the tracker's own tests cover the rest

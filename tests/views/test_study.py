"""The study's views: the row-by-row r over the steps, drawn from row_coupling_steps.csv."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dora_analysis.errors import InputError
from dora_analysis.views.study import (
    row_coupling_figure,
    sign_flips,
    sign_map_figure,
    write_row_coupling_figures,
)


def row_steps() -> pd.DataFrame:
    """A row_coupling_steps table: two cells, three methods, two modules, four steps."""
    rows = []
    for cell in ("base", "wd-0.1"):
        for k, method in enumerate(("ft", "lora", "dora")):
            for module in ("query", "value"):
                for step in (40, 80, 120, 160):
                    r = 0.1 * k - step / 1000
                    rows.append(
                        {
                            "cell": cell,
                            "method": method,
                            "stack": np.nan,
                            "module": module,
                            "step": step,
                            "matrices": 18,
                            "layers": 6,
                            "r_abs": r,
                            "r_abs_low": r - 0.1,
                            "r_abs_high": r + 0.1,
                            "r_signed": -r,
                            "r_signed_low": -r - 0.2,
                            "r_signed_high": -r + 0.2,
                            "interval": "95% layer jackknife, t(5)",
                            "interval_note": None,
                        }
                    )
    return pd.DataFrame(rows)


def test_row_coupling_figure_draws_each_methods_r_over_steps_with_its_band():
    steps = row_steps()
    fig = row_coupling_figure(steps, "base")
    axes = fig.axes
    assert len(axes) == 4  # query/value x abs/signed
    assert "query" in axes[0].get_title() and "|Δm_n|" in axes[0].get_title()
    assert "signed" in axes[1].get_title()
    assert "t(5)" in fig._suptitle.get_text() and "Fisher z" in fig._suptitle.get_text()
    lines = [line for line in axes[1].lines if line.get_label() in ("FT", "LoRA", "DoRA")]
    assert [line.get_label() for line in lines] == ["FT", "LoRA", "DoRA"]
    dora = steps[(steps.cell == "base") & (steps.method == "dora") & (steps.module == "query")]
    assert list(lines[2].get_xdata()) == [40, 80, 120, 160]
    assert lines[2].get_ydata() == pytest.approx(dora["r_signed"].to_numpy())
    band = axes[1].collections[2].get_paths()[0].vertices  # DoRA's interval band
    assert band[:, 1].min() == pytest.approx(dora["r_signed_low"].min())
    assert band[:, 1].max() == pytest.approx(dora["r_signed_high"].max())


def test_write_row_coupling_figures_one_per_cell_and_no_overwrite(tmp_path):
    undefined = (
        row_steps().query("cell == 'base'").assign(cell="magnitude-only", r_abs=np.nan, r_signed=np.nan)
    )
    steps = pd.concat([row_steps(), undefined], ignore_index=True)
    written = write_row_coupling_figures(steps, tmp_path, formats=("png",))
    assert list(written) == ["row_coupling_base", "row_coupling_wd-0.1"]  # no blank figure
    assert all(path.stat().st_size > 10_000 for paths in written.values() for path in paths)
    with pytest.raises(InputError, match="exists"):
        write_row_coupling_figures(row_steps(), tmp_path, formats=("png",))


def study_table() -> pd.DataFrame:
    """A study.csv: base (all methods), a weight-decay cell, and a DoRA-only arm whose r is undefined."""
    rows = []
    cells = [
        ("base", "base", "AdamW", {"ft": 0.9, "lora": 1.0, "dora": 0.3}),
        ("wd-0.1", "weight decay", "0.1", {"ft": 0.8, "lora": 1.0, "dora": -0.2}),
        ("magnitude-only", "trained", "magnitude only", {"dora": float("nan")}),
    ]
    for cell, factor, value, rs in cells:
        for method, r in rs.items():
            for convention in ("paper", "signed_magnitude"):
                rows.append(
                    {
                        "cell": cell,
                        "factor": factor,
                        "value": value,
                        "window": "paper",
                        "method": method,
                        "module": "query",
                        "convention": convention,
                        "seeds": 3,
                        "r": r,
                        "r_low": r - 0.5,
                        "r_high": min(r + 0.5, 1.0),
                        "r_seed_min": r - 0.1,
                        "r_seed_max": r + 0.1,
                    }
                )
    return pd.DataFrame(rows)


def test_sign_map_marks_absent_and_undefined_cells_never_as_zero():
    fig = sign_map_figure(study_table(), "query")
    panels = {ax.get_title().split(" (")[0]: ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"FT", "LoRA", "DoRA"}
    assert "paper: r = -0.31" in next(ax.get_title() for ax in fig.axes if ax.get_title().startswith("DoRA"))
    ft_texts = [t.get_text() for t in panels["FT"].texts]
    assert ft_texts.count("n/a") == 2  # FT has no magnitude-only arm: both conventions
    dora_texts = [t.get_text() for t in panels["DoRA"].texts]
    assert dora_texts.count("r undefined") == 2 and "+nan" not in " ".join(dora_texts)
    assert "-0.20\nseeds -0.30..-0.10" in dora_texts  # the second line: the seeds' own r
    image = panels["DoRA"].images[0].get_array()
    assert np.ma.is_masked(image[2, 0]) or not np.isfinite(image[2, 0])  # not painted as r = 0


def test_sign_flips_list_the_other_sign_and_skip_undefined_r():
    flips = sign_flips(study_table(), "query")
    assert list(flips["method"]) == ["dora"]
    assert flips.iloc[0]["configuration"] == "weight decay: 0.1"
    assert flips.iloc[0]["interval"] == "[-0.70, +0.30]" and not flips.iloc[0]["decided"]

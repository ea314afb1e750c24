"""The study's views: the row-by-row r over the steps, drawn from row_coupling_steps.csv."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dora_analysis.errors import InputError
from dora_analysis.views.study import row_coupling_figure, write_row_coupling_figures


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
    written = write_row_coupling_figures(row_steps(), tmp_path, formats=("png",))
    assert list(written) == ["row_coupling_base", "row_coupling_wd-0.1"]
    assert all(path.stat().st_size > 10_000 for paths in written.values() for path in paths)
    with pytest.raises(InputError, match="exists"):
        write_row_coupling_figures(row_steps(), tmp_path, formats=("png",))

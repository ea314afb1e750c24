"""Figures of the update's shape: what the intruder figure states, lines that tie, the files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from series_builders import synthetic_series

from dora_analysis.errors import InputError
from dora_analysis.views.spectrum_figures import intruders_figure, write_spectrum_figures


def intruder_series(k: int = 10, eps: float = 0.5) -> pd.DataFrame:
    """The synthetic series with intruder counts: LoRA and DoRA tie on every layer (both 2)."""
    df = synthetic_series()
    counts = {"ft": 0, "lora": 2, "dora": 2}
    return df.assign(
        intruder_dimensions=df["method"].map(counts).astype(float),
        intruder_k=float(k),
        intruder_eps=eps,
    )


def test_intruders_figure_states_k_and_eps_of_its_counts():
    fig = intruders_figure(intruder_series(k=7, eps=0.6))
    title = fig._suptitle.get_text()
    assert "k = 7" in title and "ε = 0.6" in title
    # matrices smaller than k are counted with a smaller k: the title gives the range, not one value
    mixed = intruder_series(k=7, eps=0.6)
    mixed.loc[mixed["layer"] == 0, "intruder_k"] = 4.0
    assert "k = 4..7" in intruders_figure(mixed)._suptitle.get_text()


def test_intruder_lines_that_tie_are_drawn_apart():
    fig = intruders_figure(intruder_series(), ("query",))
    lines = fig.axes[0].lines
    assert [line.get_label() for line in lines] == ["FT (step 40)", "LoRA (step 40)", "DoRA (step 40)"]
    lora, dora = (np.asarray(line.get_xdata()) for line in lines[1:])
    assert lines[1].get_ydata() == pytest.approx(lines[2].get_ydata())  # the counts tie ...
    assert np.all(dora - lora > 0.1)  # ... and the points are side by side


def test_a_series_without_the_intruder_setting_is_refused():
    with pytest.raises(InputError, match="intruder_k"):
        intruders_figure(intruder_series().drop(columns=["intruder_k"]))


def test_write_spectrum_figures_draws_the_groups_present(tmp_path):
    written = write_spectrum_figures(intruder_series(), tmp_path, formats=("png",))
    assert list(written) == ["intruders"]
    assert (tmp_path / "intruders.png").stat().st_size > 0
    with pytest.raises(InputError, match="intruders"):
        write_spectrum_figures(intruder_series(), tmp_path, formats=("png",))

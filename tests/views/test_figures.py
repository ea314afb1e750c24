"""The paper's figures drawn from a series: what each panel shows, the files, no overwriting."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from series_builders import synthetic_series

from dora_analysis.analysis.correlation import correlations
from dora_analysis.errors import InputError
from dora_analysis.views.figures import (
    direction_magnitude_figure,
    figure_modules,
    final_layers_figure,
    save_figure,
    training_curves_figure,
    write_figures,
)


def history() -> pd.DataFrame:
    rows = []
    for k, method in enumerate(("ft", "lora", "dora")):
        rows += [
            {"run": method, "method": method, "step": s, "loss": 1.5 - s / 50 - k / 10}
            for s in range(0, 41, 5)
        ]
        rows += [
            {"run": method, "method": method, "step": s, "eval_accuracy": 0.2 + s / 60, "eval_loss": 1.0}
            for s in (0, 10, 20, 30, 40)
        ]
    return pd.DataFrame(rows).groupby(["run", "method", "step"], sort=False).last().reset_index()


def test_direction_magnitude_panels_show_steps_layers_fit_and_r():
    df = synthetic_series()
    table = correlations(df)
    fig = direction_magnitude_figure(df, "value", table)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 3
    for ax, method, label in zip(axes, ("ft", "lora", "dora"), ("FT", "LoRA", "DoRA"), strict=True):
        row = table[(table.method == method) & (table.module == "value")].iloc[0]
        assert ax.get_title().startswith(f"{label}: r = {row.r:+.2f} [{row.r_low:+.2f}, {row.r_high:+.2f}]")
        # Spearman beside r, and which interval it is (issue 21: every interval says what it is)
        assert f"Spearman {row.spearman:+.2f}" in ax.get_title()
        assert ax.get_title().endswith(f"({row.interval} interval)") and "layer jackknife" in row.interval
        # one scatter per (step, layer); together they hold every point of the panel
        offsets = np.concatenate([c.get_offsets() for c in ax.collections])
        panel = df[(df.method == method) & (df.module == "value")]
        assert len(ax.collections) == 4 * 6
        assert sorted(offsets[:, 0]) == pytest.approx(sorted(panel.delta_direction))
        # the dashed line is the least-squares fit
        line = ax.lines[0]
        x, y = line.get_xdata(), line.get_ydata()
        assert (y[-1] - y[0]) / (x[-1] - x[0]) == pytest.approx(
            np.polyfit(panel.delta_direction, panel.delta_magnitude, 1)[0]
        )
    markers = {c.get_paths()[0].vertices.tobytes() for c in axes[0].collections}
    colours = {tuple(np.round(c.get_facecolor()[0], 4)) for c in axes[0].collections}
    assert len(markers) == 4 and len(colours) == 6  # marker = step, colour = layer
    step_legend, layer_legend = fig.legends
    assert [t.get_text() for t in step_legend.get_texts()] == ["10", "20", "30", "40"]
    assert [t.get_text() for t in layer_legend.get_texts()] == [str(i) for i in range(6)]


def test_final_layers_uses_each_runs_last_step():
    df = synthetic_series()
    fig = final_layers_figure(df, "query")
    magnitude_axis = fig.axes[0]
    assert [line.get_label() for line in magnitude_axis.lines] == [
        "FT (step 40)",
        "LoRA (step 40)",
        "DoRA (step 40)",
    ]
    lora = df[(df.method == "lora") & (df.module == "query") & (df.step == 40)].sort_values("layer")
    assert magnitude_axis.lines[1].get_ydata() == pytest.approx(lora.delta_magnitude.to_numpy())
    # each run's points sit within a third of a layer of the layer's tick
    assert magnitude_axis.lines[1].get_xdata() == pytest.approx(lora.layer.to_numpy(float), abs=0.16)


def test_final_layers_lines_with_equal_values_do_not_hide_each_other():
    # LoRA and DoRA given the very same ΔM and ΔD: their points must still be drawn apart
    df = synthetic_series()
    lora = df[df.method == "lora"]
    df = pd.concat([df[df.method != "dora"], lora.assign(method="dora")], ignore_index=True)
    fig = final_layers_figure(df, "query")
    for axis in fig.axes[:2]:
        points = [set(zip(line.get_xdata(), line.get_ydata(), strict=True)) for line in axis.lines]
        assert len(points) == 3
        for i in range(3):
            for j in range(i + 1, 3):
                assert not points[i] & points[j], (axis.get_title(), i, j)
        # in layer order, and offset symmetrically about the ticks
        offsets = [np.mean(np.asarray(line.get_xdata()) - np.arange(6)) for line in axis.lines]
        assert offsets == pytest.approx([-0.15, 0.0, 0.15])


def test_training_curves_draw_metric_and_loss_per_method():
    fig = training_curves_figure(history())
    metric_axis, loss_axis = fig.axes
    assert metric_axis.get_ylabel() == "held-out accuracy"
    assert len(metric_axis.lines) == 3 and len(loss_axis.lines) == 3
    assert list(loss_axis.lines[2].get_xdata()) == list(range(0, 41, 5))


@pytest.mark.slow
def test_write_figures_png_200_dpi_pdf_and_refuses_to_overwrite(tmp_path):
    df = synthetic_series()
    written = write_figures(df, tmp_path, history=history(), modules=["value"], formats=("png", "pdf"))
    assert list(written) == ["direction_magnitude_value", "final_layers_value", "training_curves"]
    for paths in written.values():
        png, pdf = paths
        assert png.suffix == ".png" and pdf.read_bytes().startswith(b"%PDF")
        assert Image.open(png).info["dpi"] == pytest.approx((200, 200), abs=0.5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for ps in written.values() for p in ps} == {
        0o666 & ~mask
    }  # not mkstemp's 0600
    before = written["training_curves"][0].stat().st_mtime_ns
    with pytest.raises(InputError, match="already exists"):
        write_figures(df, tmp_path, history=history())
    assert written["training_curves"][0].stat().st_mtime_ns == before
    fig = training_curves_figure(history())
    assert save_figure(fig, tmp_path / "training_curves", formats=("png",), overwrite=True) == [
        written["training_curves"][0]
    ]


def test_figure_modules_are_the_papers_when_present():
    df = synthetic_series()
    assert figure_modules(df) == ["query", "value"]
    assert figure_modules(df.assign(module="dense")) == ["dense"]


def test_missing_module_is_a_clear_error():
    with pytest.raises(InputError, match="no analysed points"):
        direction_magnitude_figure(synthetic_series(), "key")

"""Figures and report keep stacks and runs apart: one panel / file / row per (run, stack, module)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from series_builders import bart_like_series, synthetic_series

from dora_analysis.analysis.correlation import correlations
from dora_analysis.errors import InputError
from dora_analysis.views.figures import (
    direction_magnitude_figure,
    figure_modules,
    figure_panels,
    final_layers_figure,
    training_curves_figure,
    write_figures,
)
from dora_analysis.views.report import render_report


def panel_points(ax) -> np.ndarray:
    return np.concatenate([c.get_offsets() for c in ax.collections])


@pytest.mark.slow
def test_bart_figures_are_one_file_per_stack_and_module(tmp_path):
    df = bart_like_series()
    table = correlations(df)
    assert figure_modules(df) == ["self_attn.q_proj", "encoder_attn.q_proj"]
    assert figure_panels(df, figure_modules(df)) == [
        ("encoder", "self_attn.q_proj"),
        ("decoder", "self_attn.q_proj"),
        ("decoder", "encoder_attn.q_proj"),
    ]
    # one module name in two stacks: two files of each figure (one module keeps the test quick)
    written = write_figures(df, tmp_path, table=table, modules=["self_attn.q_proj"], formats=("png",))
    assert list(written) == [
        "direction_magnitude_encoder_self_attn.q_proj",
        "direction_magnitude_decoder_self_attn.q_proj",
        "final_layers_encoder_self_attn.q_proj",
        "final_layers_decoder_self_attn.q_proj",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.png" for n in written)
    assert figure_panels(synthetic_series(), ["query"]) == [(None, "query")]


def test_a_panel_holds_one_stacks_points_and_that_rows_r():
    df = bart_like_series()
    table = correlations(df)
    with pytest.raises(InputError, match="several stacks"):
        direction_magnitude_figure(df, "self_attn.q_proj", table)
    fig = direction_magnitude_figure(df, "self_attn.q_proj", table, stack="decoder")
    for ax, method in zip(fig.axes[:3], ("ft", "lora", "dora"), strict=True):
        rows = df[(df.method == method) & (df["stack"] == "decoder") & (df.module == "self_attn.q_proj")]
        assert sorted(panel_points(ax)[:, 0]) == pytest.approx(sorted(rows.delta_direction))
        row = table[
            (table.method == method) & (table["stack"] == "decoder") & (table.module == "self_attn.q_proj")
        ]
        assert (
            f"r = {row.r.item():+.2f} [{row.r_low.item():+.2f}, {row.r_high.item():+.2f}]" in ax.get_title()
        )
    assert fig._suptitle.get_text().startswith("decoder self_attn.q_proj")
    final = final_layers_figure(df, "self_attn.q_proj", stack="encoder")
    lora = df[
        (df.method == "lora")
        & (df["stack"] == "encoder")
        & (df.module == "self_attn.q_proj")
        & (df.step == 30)
    ]
    assert final.axes[0].lines[1].get_ydata() == pytest.approx(
        lora.sort_values("layer").delta_magnitude.to_numpy()
    )


def two_seeds() -> pd.DataFrame:
    first = synthetic_series(seed=1, slopes={"dora": -1.0}).assign(run="dora-s0")
    second = synthetic_series(seed=2, slopes={"dora": -1.0}).assign(run="dora-s1")
    return pd.concat([first, second], ignore_index=True)


def test_runs_of_one_method_get_their_own_panels_lines_and_rows():
    df = two_seeds()
    table = correlations(df)
    fig = direction_magnitude_figure(df, "query", table)
    panels = [ax for ax in fig.axes if ax.collections]
    assert len(panels) == 2
    for ax, run in zip(panels, ("dora-s0", "dora-s1"), strict=True):
        row = table[(table.run == run) & (table.module == "query")].iloc[0]
        assert ax.get_title().startswith(f"DoRA ({run}): r = {row.r:+.2f}")
        assert len(panel_points(ax)) == 24
    pooled = correlations(df, pool_runs=True)
    fig = direction_magnitude_figure(df, "query", pooled)
    r = pooled[pooled.module == "query"].r.item()
    assert all(f"r pooled = {r:+.2f}" in ax.get_title() for ax in fig.axes if ax.collections)
    final = final_layers_figure(df, "query")
    assert [line.get_label() for line in final.axes[0].lines] == [
        "DoRA (dora-s0) (step 40)",
        "DoRA (dora-s1) (step 40)",
    ]

    text = render_report(df, table, pd.DataFrame())
    assert (
        "| DoRA | dora-s0 | query | 24 | 4 x 6 |" in text
        and "| DoRA | dora-s1 | value | 24 | 4 x 6 |" in text
    )
    assert "- DoRA (dora-s0): paper r = -0.31" in text and "- DoRA (dora-s1): paper r = -0.31" in text
    pooled_text = render_report(df, pooled, pd.DataFrame())
    assert "| DoRA | dora-s0+dora-s1 | query | 48 | 4 x 6 |" in pooled_text


def test_training_curves_fall_back_to_held_out_loss():
    history = pd.DataFrame(
        [
            {"run": "lora", "method": "lora", "step": s, "loss": 1.0 - s / 100, "eval_loss": 0.9 - s / 200}
            for s in (0, 10, 20)
        ]
    )
    fig = training_curves_figure(history)
    metric_axis, loss_axis = fig.axes
    assert metric_axis.get_visible() and metric_axis.get_ylabel() == "held-out loss"
    assert list(metric_axis.lines[0].get_ydata()) == pytest.approx([0.9, 0.85, 0.8])


def minilm_like() -> pd.DataFrame:
    """The demo's shape with full module paths: query/value in the encoder, the pooler in its own stack."""
    df = synthetic_series()
    df = df.assign(module="attention.self." + df.module, stack="encoder")
    pooler = df[df.module == "attention.self.query"].drop_duplicates("step")
    pooler = pooler.assign(module="pooler.dense", stack="model", layer=pd.NA)
    both = pd.concat([df, pooler], ignore_index=True)
    return both.assign(layer=both.layer.astype("Int64"))


def test_short_paper_names_select_full_module_paths_in_one_stack():
    df = minilm_like()
    table = correlations(df)
    assert figure_modules(df) == ["query", "value"]  # so the demo's files keep their names
    assert figure_panels(df, ["query", "value"]) == [("encoder", "query"), ("encoder", "value")]
    fig = direction_magnitude_figure(df, "value", table)
    lora = table[(table.method == "lora") & (table.module == "attention.self.value")].iloc[0]
    assert (
        fig.axes[1].get_title().startswith(f"LoRA: r = {lora.r:+.2f} [{lora.r_low:+.2f}, {lora.r_high:+.2f}]")
    )
    text = render_report(df, table, pd.DataFrame())
    assert "| FT | encoder | attention.self.query | 24 | 4 x 6 |" in text  # two stacks: the column shows
    assert "| FT | model | pooler.dense |" in text and "- FT: paper r = -0.62, ours r = " in text
    assert "| LoRA | attention.self.value |" in text  # the final-step table: one stack, no column
    bart = bart_like_series()
    with pytest.raises(InputError, match="several modules"):
        direction_magnitude_figure(bart, "q_proj", correlations(bart), stack="decoder")

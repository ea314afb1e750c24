"""The dense Figure 2: each layer's path in the (ΔD, ΔM) plane as training goes.

Drawn from a tracked frame (``deltas.csv`` of ``train --track-every`` or
:class:`~dora_analysis.DecompositionCallback`, or any series with several steps): one panel per run,
one line per layer through its steps in order, a hollow circle at the first step and a filled one at
the last. Views draw the frame they are given; they compute no statistics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dora_analysis.errors import InputError
from dora_analysis.schema import method_label, method_order, module_mask
from dora_analysis.views.figures import figure_modules, figure_panels
from dora_analysis.views.style import figure_style, refuse_existing_figures, save_figure

__all__ = ["trajectories_figure", "write_trajectories"]


def _rows(df: pd.DataFrame, module: str, stack: str | None) -> pd.DataFrame:
    """The finite rows of ``module`` (in ``stack``), ordered by step."""
    rows = df[module_mask(df["module"], module)]
    if stack is not None and "stack" in rows.columns:
        rows = rows[rows["stack"] == stack]
    elif "stack" in rows.columns and rows["stack"].nunique() > 1:
        raise InputError.of(
            module, f"is in several stacks {sorted(rows['stack'].unique())}; pick one with stack="
        )
    finite = np.isfinite(rows["delta_direction"]) & np.isfinite(rows["delta_magnitude"])
    return rows[finite].sort_values("step", kind="stable")


def _panels(rows: pd.DataFrame) -> list[tuple[str, str | None]]:
    runs = rows["run"] if "run" in rows.columns else pd.Series([None] * len(rows), index=rows.index)
    pairs = list(dict.fromkeys(zip(rows["method"], runs, strict=True)))
    order = {m: i for i, m in enumerate(method_order(rows["method"]))}
    return sorted(pairs, key=lambda pair: order[pair[0]])


def trajectories_figure(df: pd.DataFrame, module: str = "query", stack: str | None = None):
    """Each layer's (ΔD, ΔM) path over the steps for one module, one panel per run.

    Args:
        df: a tracked frame or series (``method``, ``module``, ``step``, ``layer``,
            ``delta_direction``, ``delta_magnitude``; ``run`` and ``stack`` when present).
        module: which matrices (``"query"``, ``"self_attn.q_proj"``, ...).
        stack: which stack, where ``module`` is in several.
    Returns:
        A matplotlib Figure.
    Raises:
        InputError: no finite rows for ``module``, or ``module`` in several stacks and no ``stack``.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    rows = _rows(df, module, stack)
    if rows.empty:
        raise InputError.of(module, "no tracked rows for this module in the frame")
    panels = _panels(rows)
    layers = sorted(rows["layer"].dropna().unique())
    palette = sns.color_palette("viridis", max(len(layers), 1))
    colours = dict(zip(layers, palette, strict=False))
    with figure_style():
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.4, 4.0), squeeze=False)
        for ax, (method, run) in zip(axes[0], panels, strict=True):
            panel = rows[rows["method"] == method]
            if run is not None:
                panel = panel[panel["run"] == run]
            for layer, path in panel.groupby("layer", dropna=False, sort=True):
                colour = colours.get(layer, "0.5")  # grey: a matrix outside the numbered layers
                x, y = path["delta_direction"].to_numpy(), path["delta_magnitude"].to_numpy()
                ax.plot(
                    x,
                    y,
                    color=colour,
                    lw=1.3,
                    alpha=0.9,
                    label=f"layer {layer}" if pd.notna(layer) else "other",
                )
                ax.scatter(x[:1], y[:1], s=28, facecolor="white", edgecolor=colour, zorder=3)
                ax.scatter(x[-1:], y[-1:], s=36, color=colour, edgecolor="black", linewidth=0.5, zorder=3)
            steps = panel["step"].dropna()
            span = f"steps {int(steps.min())}-{int(steps.max())}" if len(steps) else ""
            title = method_label(method) + (f" ({run})" if run is not None and len(panels) > 1 else "")
            ax.set_title(f"{title}\n{span}, {panel['step'].nunique()} points per layer")
            ax.set_xlabel("ΔD")
            ax.set_ylabel("ΔM")
            ax.ticklabel_format(style="sci", scilimits=(-3, 3), useMathText=True)
            ax.xaxis.set_major_locator(MaxNLocator(4))  # long tick labels must not run into each other
        handles, labels = axes[0][-1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title=module)
        fig.tight_layout()
    return fig


def write_trajectories(
    df: pd.DataFrame,
    out_dir: str | os.PathLike,
    modules: Sequence[str] | None = None,
    formats: Sequence[str] = ("png", "pdf"),
    overwrite: bool = False,
) -> dict[str, list[Path]]:
    """Write ``trajectories_<module>`` (``trajectories_<stack>_<module>`` where stacks differ) figures.

    Returns:
        ``{figure name: [written paths]}``.
    Raises:
        InputError: a target exists and ``overwrite`` is False (checked before anything is drawn).
    """
    out = Path(out_dir)
    panels = figure_panels(df, list(modules) if modules is not None else figure_modules(df))
    with_stack = len({stack for stack, _ in panels}) > 1
    names = ["_".join(["trajectories", *([str(st)] if with_stack and st else []), m]) for st, m in panels]
    names = [name.replace("/", "_").replace(" ", "_") for name in names]
    if not overwrite:
        refuse_existing_figures(out, names, formats)
    written = {}
    for name, (stack, module) in zip(names, panels, strict=True):
        fig = trajectories_figure(df, module, stack=stack if with_stack else None)
        written[name] = save_figure(fig, out / name, formats, overwrite=True)
    return written

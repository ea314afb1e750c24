"""Figures of the update's shape, drawn from a series analysed with ``metrics="spectrum,intruders"``.

- :func:`spectrum_layers_figure`: per layer at each run's final step, FT vs LoRA vs DoRA: the
  update's relative norm, stable rank, effective rank and rank for 90% of its energy.
- :func:`intruders_figure`: intruder dimensions per layer at the final step, one panel per module.
- :func:`subspace_figure`: ``subspace_to_final`` against the step, one panel per method, one line
  per layer: when does the update's direction settle?

Same look and saving as :mod:`dora_analysis.views.figures` (both use :mod:`dora_analysis.views.style`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dora_analysis.errors import InputError
from dora_analysis.schema import method_label, method_order, module_mask, select_modules
from dora_analysis.views.style import (
    dodge,
    figure_style,
    final_step,
    layer_colours,
    line_style,
    method_colours,
    pyplot,
    refuse_existing_figures,
    save_figure,
)

__all__ = ["spectrum_layers_figure", "intruders_figure", "subspace_figure", "write_spectrum_figures"]

SPECTRUM_PANELS = (
    ("update_rel_norm", r"$\|\Delta W\|_F / \|W_0\|_F$"),
    ("update_stable_rank", "stable rank"),
    ("update_effective_rank", "effective rank"),
    ("update_rank90", "rank for 90% of energy"),
)


def _per_layer(ax, data: pd.DataFrame, column: str, methods: Sequence[str], palette: dict) -> None:
    for index, method in enumerate(methods):
        rows = data[data["method"] == method].groupby("layer")[column].mean()
        linestyle, marker = line_style(method)
        step = int(data.loc[data["method"] == method, "step"].max())
        ax.plot(
            rows.index.astype("float64") + dodge(index, len(methods)),  # side by side: counts often tie
            rows.to_numpy(),
            marker=marker,
            linestyle=linestyle,
            color=palette[method],
            label=f"{method_label(method)} (step {step})",
            linewidth=1.6,
            markersize=6,
            markerfacecolor="none" if method == "lora" else palette[method],
        )
    ax.set_xlabel("layer")
    ax.set_xticks(sorted(data["layer"].dropna().unique()))


def _final(df: pd.DataFrame, module: str | None, columns: Sequence[str]) -> pd.DataFrame:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError.of(missing[0], "not in the series; analyse it with metrics='spectrum,intruders'")
    data = df if module is None else select_modules(df, [module])
    data = final_step(data.dropna(subset=["step"]))
    if data.empty:
        raise InputError.of(module or "series", "no analysed points for this module in the series")
    return data


def spectrum_layers_figure(df: pd.DataFrame, module: str = "query"):
    """The update's relative norm, stable rank, effective rank and rank90 per layer at the final step."""
    plt = pyplot()
    data = _final(df, module, [c for c, _ in SPECTRUM_PANELS])
    methods = method_order(data["method"])
    palette = method_colours(methods)
    with figure_style():
        fig, axes = plt.subplots(1, len(SPECTRUM_PANELS), figsize=(4.2 * len(SPECTRUM_PANELS), 3.6))
        for ax, (column, label) in zip(axes, SPECTRUM_PANELS, strict=True):
            _per_layer(ax, data, column, methods, palette)
            values = data[column][data[column] > 0]
            if column == "update_rel_norm" and len(values) and values.max() / values.min() > 30:
                ax.set_yscale("log")
            ax.set_title(label)
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        fig.suptitle(f"{module}: shape of the update $\\Delta W = W_t - W_0$ per layer", fontsize="medium")
        fig.tight_layout()
    return fig


def intruders_figure(df: pd.DataFrame, modules: Sequence[str] = ("query", "value")):
    """Intruder dimensions (Shuttleworth et al. 2024) per layer at the final step, one panel per module.

    The title states the k (top singular vectors examined) and ε (the |cos| threshold) of the counts,
    from the series' ``intruder_k``/``intruder_eps`` columns.
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    data = _final(select_modules(df, modules), None, ["intruder_dimensions", "intruder_k", "intruder_eps"])
    modules = [m for m in modules if m in set(data["module"])]
    methods = method_order(data["method"])
    palette = method_colours(methods)
    with figure_style():
        fig, axes = plt.subplots(1, len(modules), figsize=(4.6 * len(modules) + 1.5, 3.6), squeeze=False)
        for ax, module in zip(axes[0], modules, strict=True):
            _per_layer(ax, data[data["module"] == module], "intruder_dimensions", methods, palette)
            ax.set_ylabel("intruder dimensions")
            ax.set_ylim(bottom=-0.3)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
            ax.set_title(module)
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        fig.suptitle(
            f"intruders: of the top k = {_setting(data['intruder_k'])} left singular vectors of $W_t$, those "
            f"with |cos| < ε = {_setting(data['intruder_eps'])} to every one of $W_0$",
            fontsize="medium",
        )
        fig.tight_layout()
    return fig


def _setting(values: pd.Series) -> str:
    """One value (``10``), or the range where matrices differ (``4..10``: k is at most the smaller side)."""
    values = values.dropna()
    low, high = values.min(), values.max()
    return f"{low:g}" if low == high else f"{low:g}..{high:g}"


def subspace_figure(df: pd.DataFrame, module: str = "query"):
    """``subspace_to_final`` (φ of each checkpoint's update with its run's final one) against the step."""
    plt = pyplot()
    if "subspace_to_final" not in df.columns:
        raise InputError.of("subspace_to_final", "not in the series; analyse it with metrics='spectrum'")
    data = select_modules(df, [module])
    data = data[np.isfinite(data["subspace_to_final"].astype(float))]
    if data.empty:
        raise InputError.of(module, "no subspace_to_final values for this module in the series")
    methods = method_order(data["method"])
    layers = sorted(data["layer"].dropna().unique())
    colours = layer_colours(layers)
    with figure_style():
        fig, axes = plt.subplots(1, len(methods), figsize=(3.9 * len(methods) + 1.2, 3.5), squeeze=False)
        for ax, method in zip(axes[0], methods, strict=True):
            panel = data[data["method"] == method]
            for layer in layers:
                rows = panel[panel["layer"] == layer].sort_values("step")
                ax.plot(
                    rows["step"],
                    rows["subspace_to_final"],
                    marker="o",
                    color=colours[layer],
                    label=f"{int(layer)}",
                )
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel("step")
            ax.set_title(method_label(method))
        axes[0][0].set_ylabel(r"$\varphi$(update, final update)")
        axes[0][-1].legend(title="layer", loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        fig.suptitle(
            f"{module}: subspace similarity of the top-8 left singular vectors to the final update",
            fontsize="medium",
        )
        fig.tight_layout()
    return fig


def write_spectrum_figures(
    series: pd.DataFrame,
    out_dir: str | os.PathLike,
    modules: Sequence[str] = ("query", "value"),
    formats: Sequence[str] = ("png", "pdf"),
    overwrite: bool = False,
) -> dict[str, list[Path]]:
    """Write ``update_spectrum_<module>``, ``intruders`` and ``subspace_to_final_<module>`` into ``out_dir``.

    Only the groups present in ``series`` are drawn. Returns ``{figure name: [written paths]}``.

    Raises:
        InputError: a target exists and ``overwrite`` is False (checked before anything is drawn).
    """
    out = Path(out_dir)
    modules = [m for m in modules if module_mask(series["module"], m).any()]  # short names select paths
    plan = []
    if "update_rank90" in series.columns:
        plan += [(f"update_spectrum_{m}", lambda m=m: spectrum_layers_figure(series, m)) for m in modules]
    if "intruder_dimensions" in series.columns and modules:
        plan.append(("intruders", lambda: intruders_figure(series, modules)))
    if "subspace_to_final" in series.columns:
        plan += [(f"subspace_to_final_{m}", lambda m=m: subspace_figure(series, m)) for m in modules]
    if not overwrite:
        refuse_existing_figures(out, [name for name, _ in plan], formats)
    return {name: save_figure(draw(), out / name, formats, overwrite=True) for name, draw in plan}

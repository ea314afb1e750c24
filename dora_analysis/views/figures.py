"""The paper's figures drawn from the series DataFrame (views of the frame; no file reading here).

- :func:`direction_magnitude_figure`: Figure 2 (query) / Figure 7 (value) style, one panel per
  method, x = ΔD, y = ΔM, marker = training step, colour = layer, the least-squares line, and
  Pearson r with its bootstrap interval in the panel title.
- :func:`final_layers_figure`: Figure 3 / 8 style, ΔM and ΔD per layer at each run's final step,
  methods side by side.
- :func:`training_curves_figure`: held-out metric and training loss per step, per method.

Figures are built inside :func:`figure_style` (seaborn ``whitegrid``, sizes readable at the width
the paper prints them) and saved by :func:`save_figure` as PNG (200 dpi) and PDF, atomically.
matplotlib is imported inside the functions, with the ``Agg`` backend (no display needed).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dora_analysis.atomic import atomic_path, refuse_existing
from dora_analysis.errors import InputError
from dora_analysis.schema import default_metric, method_label, method_order, module_is, module_mask, points

__all__ = [
    "figure_style",
    "direction_magnitude_figure",
    "final_layers_figure",
    "training_curves_figure",
    "save_figure",
    "figure_modules",
    "write_figures",
]

# Filled markers that stay distinct at small sizes; steps beyond eight reuse them.
STEP_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DPI = 200


def _methods(df: pd.DataFrame) -> list[str]:
    return method_order(df["method"])


def _pyplot():
    """``matplotlib.pyplot`` on the ``Agg`` backend (files only), unless a backend was already chosen
    (a notebook's inline backend is left alone)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def figure_style() -> Iterator[None]:
    """seaborn's ``whitegrid`` look at ``paper`` scale, enlarged to stay legible when printed small."""
    _pyplot()
    import seaborn as sns

    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.35):
        yield


def _format_axis(ax, which: str, label: str, values) -> None:
    """Label ``ax``'s ``which`` ("x"/"y") axis, moving a power of ten into the label (``×10⁻⁵``).

    matplotlib's own offset text collides with the axis label on small panels.
    """
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    largest = float(np.nanmax(np.abs(values))) if len(values) else 0.0
    exponent = int(np.floor(np.log10(largest))) if largest > 0 else 0
    if -2 <= exponent <= 3:
        exponent = 0
    scale = 10.0**exponent
    axis.set_major_locator(MaxNLocator(nbins=5))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / scale:.4g}"))
    if exponent:
        label = f"{label} $\\times 10^{{{exponent}}}$"
    (ax.set_xlabel if which == "x" else ax.set_ylabel)(label)


def _layer_colours(layers: Sequence) -> dict:
    import seaborn as sns

    palette = sns.color_palette("colorblind" if len(layers) <= 10 else "husl", len(layers))
    return dict(zip(layers, palette, strict=True))


def _panel_title(method: str, stats: pd.Series | None) -> str:
    if stats is None or not np.isfinite(stats["r"]):
        return method_label(method)
    interval = ""
    if np.isfinite(stats["r_low"]):
        interval = f" [{stats['r_low']:+.2f}, {stats['r_high']:+.2f}]"
    return f"{method_label(method)}: r = {stats['r']:+.2f}{interval}"


def direction_magnitude_figure(df: pd.DataFrame, module: str = "query", table: pd.DataFrame | None = None):
    """Figure 2/7: ΔM against ΔD for one module, one panel per method.

    Args:
        df: the series (``method``, ``module``, ``step``, ``layer``, ``delta_direction``,
            ``delta_magnitude``).
        module: which matrices (``"query"``, ``"value"``, ...).
        table: :func:`~dora_analysis.correlations` of ``df``; without it the panels carry no r and
            no fitted line (views draw the frame; they compute no statistics).
    Returns:
        A matplotlib Figure.
    """
    from matplotlib.lines import Line2D

    plt = _pyplot()

    data = points(df[module_mask(df["module"], module)])
    if data.empty:
        raise InputError.of(module, "no analysed points for this module in the series")
    methods = _methods(data)
    steps = sorted(data["step"].unique())
    layers = sorted(data["layer"].dropna().unique())
    colours = _layer_colours(layers)
    markers = {s: STEP_MARKERS[i % len(STEP_MARKERS)] for i, s in enumerate(steps)}

    with figure_style():
        fig, axes = plt.subplots(1, len(methods), figsize=(3.9 * len(methods) + 1.5, 3.9), squeeze=False)
        for ax, method in zip(axes[0], methods, strict=True):
            panel = data[data["method"] == method]
            for (step, layer), group in panel.groupby(["step", "layer"]):
                ax.scatter(
                    group["delta_direction"],
                    group["delta_magnitude"],
                    marker=markers[step],
                    color=colours[layer],
                    s=46,
                    edgecolor="black",
                    linewidth=0.4,
                    zorder=3,
                )
            x = panel["delta_direction"].to_numpy(np.float64)
            y = panel["delta_magnitude"].to_numpy(np.float64)
            stats = None
            if table is not None:
                found = table[(table["method"] == method) & module_mask(table["module"], module)]
                stats = found.iloc[0] if len(found) else None
            if stats is not None and np.isfinite(stats["slope"]):
                line_x = np.linspace(x.min(), x.max(), 50)
                ax.plot(
                    line_x,
                    stats["slope"] * line_x + stats["intercept"],
                    color="0.25",
                    linestyle="--",
                    linewidth=1.3,
                    zorder=2,
                )
            ax.set_title(_panel_title(method, stats))
            _format_axis(ax, "x", r"$\Delta D$ (direction change)", x)
            _format_axis(ax, "y", r"$\Delta M$ (magnitude change)", y)
        step_handles = [
            Line2D(
                [],
                [],
                linestyle="",
                marker=markers[s],
                color="0.45",
                markeredgecolor="black",
                markeredgewidth=0.4,
                markersize=7,
                label=f"{s}",
            )
            for s in steps
        ]
        layer_handles = [
            Line2D(
                [],
                [],
                linestyle="",
                marker="o",
                color=colours[layer],
                markeredgecolor="black",
                markeredgewidth=0.4,
                markersize=7,
                label=f"{int(layer)}",
            )
            for layer in layers
        ]
        top = fig.legend(
            handles=step_handles, title="step", loc="upper left", bbox_to_anchor=(0.885, 0.93), frameon=False
        )
        fig.add_artist(top)
        fig.legend(
            handles=layer_handles,
            title="layer",
            loc="upper left",
            ncols=1 if len(layers) <= 8 else 2,
            bbox_to_anchor=(0.945, 0.93),
            frameon=False,
        )
        fig.suptitle(
            f"{module}: magnitude vs direction change (marker = step, colour = layer, "
            "dashed = least-squares fit)",
            fontsize="medium",
        )
        fig.tight_layout(rect=(0, 0, 0.88, 0.97))
    return fig


def _final_step(df: pd.DataFrame) -> pd.DataFrame:
    """Each run's rows at its last step (``run`` column if present, else per method)."""
    key = "run" if "run" in df.columns else "method"
    last = df.groupby(key)["step"].transform("max")
    return df[df["step"] == last]


def final_layers_figure(df: pd.DataFrame, module: str = "query"):
    """Figure 3/8: ΔM (left) and ΔD (right) per layer at each run's final step, methods side by side.

    A log scale is used when the methods differ by more than 30x (full fine-tuning with a small
    learning rate moves far less than the adapters), so every method stays visible.
    """
    plt = _pyplot()
    data = _final_step(df[module_mask(df["module"], module)])
    data = data[np.isfinite(data["delta_direction"]) & np.isfinite(data["delta_magnitude"])]
    if data.empty:
        raise InputError.of(module, "no analysed points for this module in the series")
    methods = _methods(data)
    palette = _method_colours(methods)
    with figure_style():
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
        for ax, column, label in (
            (axes[0], "delta_magnitude", r"$\Delta M$"),
            (axes[1], "delta_direction", r"$\Delta D$"),
        ):
            for method in methods:
                rows = data[data["method"] == method].groupby("layer")[column].mean()
                step = int(data.loc[data["method"] == method, "step"].max())
                linestyle, marker = _line_style(method)
                ax.plot(
                    rows.index,
                    rows.to_numpy(),
                    marker=marker,
                    linestyle=linestyle,
                    color=palette[method],
                    label=f"{method_label(method)} (step {step})",
                    linewidth=1.6,
                    markersize=6,
                    markerfacecolor="none" if method == "lora" else palette[method],
                )
            values = data[column][data[column] > 0]
            if len(values) and values.max() / values.min() > 30:
                ax.set_yscale("log")
                ax.set_ylabel(label)
            else:
                _format_axis(ax, "y", label, data[column].to_numpy())
            ax.set_xlabel("layer")
            ax.set_xticks(sorted(data["layer"].dropna().unique()))
            ax.set_title(f"{label} of {module} per layer")
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)  # outside: lines cross
        fig.tight_layout()
    return fig


# Line style and marker per method, so that overlapping lines (LoRA and DoRA often share ΔD) stay visible.
_METHOD_LINES = {"ft": (":", "^"), "lora": ("--", "s"), "dora": ("-", "o")}


def _line_style(method: str) -> tuple[str, str]:
    return _METHOD_LINES.get(str(method).lower(), ("-.", "D"))


def _method_colours(methods: Sequence[str]) -> dict:
    import seaborn as sns

    palette = sns.color_palette("deep", 10)
    fixed = {"ft": palette[7], "lora": palette[0], "dora": palette[3]}  # grey, blue, red
    others = iter(palette[1:3] + palette[4:7] + palette[8:])
    return {m: fixed.get(m) or next(others) for m in methods}


def training_curves_figure(history: pd.DataFrame, metric: str | None = None):
    """Held-out metric (left) and training loss (right) per step, one line per method.

    Args:
        history: columns ``method``, ``step``, ``loss`` and the metric column (the first
            ``eval_*`` column that is not a loss or a timing when ``metric`` is None).
    """
    plt = _pyplot()
    metric = metric or default_metric(history.columns)
    methods = _methods(history)
    palette = _method_colours(methods)
    with figure_style():
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4))
        for ax, column, label in (
            (axes[0], metric, _metric_label(metric)),
            (axes[1], "loss", "training loss"),
        ):
            if column is None or column not in history.columns:
                ax.set_visible(False)
                continue
            for method in methods:
                rows = history[(history["method"] == method) & history[column].notna()].sort_values("step")
                linestyle, marker = _line_style(method)
                ax.plot(
                    rows["step"],
                    rows[column],
                    marker=marker if len(rows) <= 25 else None,
                    linestyle=linestyle,
                    markersize=5,
                    color=palette[method],
                    label=method_label(method),
                    linewidth=1.6,
                    markerfacecolor="none" if method == "lora" else palette[method],
                )
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.set_title(label)
        axes[0].legend(frameon=True, fontsize="small")
        fig.tight_layout()
    return fig


def _metric_label(metric: str | None) -> str:
    if metric is None:
        return ""
    return "held-out " + metric.removeprefix("eval_").replace("_", " ")


def save_figure(
    fig,
    stem: str | os.PathLike,
    formats: Sequence[str] = ("png", "pdf"),
    overwrite: bool = False,
    dpi: int = DPI,
) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` (``dpi``) and ``<stem>.pdf``, each through a temporary file.

    Raises:
        InputError: a target exists and ``overwrite`` is False (checked before anything is written).
    """
    plt = _pyplot()
    stem = Path(stem)
    targets = [stem.with_name(f"{stem.name}.{fmt}") for fmt in formats]
    for target in targets:
        refuse_existing(target, overwrite)  # all checked before anything is written
    for target, fmt in zip(targets, formats, strict=True):
        with atomic_path(target) as temporary:
            # A fixed date keeps the PDF bytes stable from run to run.
            metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
            fig.savefig(temporary, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
    plt.close(fig)
    return targets


def figure_modules(df: pd.DataFrame) -> list[str]:
    """The modules to draw: query and value as in the paper, else every module in ``df``."""
    present = list(dict.fromkeys(points(df)["module"]))
    paper = [m for m in ("query", "value") if any(module_is(p, m) for p in present)]
    return paper or present


def write_figures(
    series: pd.DataFrame,
    out_dir: str | os.PathLike,
    history: pd.DataFrame | None = None,
    table: pd.DataFrame | None = None,
    modules: Sequence[str] | None = None,
    formats: Sequence[str] = ("png", "pdf"),
    overwrite: bool = False,
) -> dict[str, list[Path]]:
    """Write every figure of the series into ``out_dir``.

    Files: ``direction_magnitude_<module>`` (Figure 2/7), ``final_layers_<module>`` (Figure 3/8)
    and ``training_curves`` (when ``history`` is given), each in ``formats``.

    Returns:
        ``{figure name: [written paths]}`` in the order drawn.
    Raises:
        InputError: a target exists and ``overwrite`` is False (checked before anything is drawn).
    """
    out = Path(out_dir)
    modules = list(modules) if modules is not None else figure_modules(series)
    names = [f"direction_magnitude_{m}" for m in modules] + [f"final_layers_{m}" for m in modules]
    if history is not None and not history.empty:
        names.append("training_curves")
    if not overwrite:
        for name in names:
            for fmt in formats:
                if (out / f"{name}.{fmt}").exists():
                    raise InputError.of(
                        out / f"{name}.{fmt}", "already exists; pass --overwrite to replace it"
                    )
    written: dict[str, list[Path]] = {}
    for module in modules:
        fig = direction_magnitude_figure(series, module, table)
        written[f"direction_magnitude_{module}"] = save_figure(
            fig, out / f"direction_magnitude_{module}", formats, overwrite=True
        )
    for module in modules:
        fig = final_layers_figure(series, module)
        written[f"final_layers_{module}"] = save_figure(
            fig, out / f"final_layers_{module}", formats, overwrite=True
        )
    if "training_curves" in names:
        written["training_curves"] = save_figure(
            training_curves_figure(history), out / "training_curves", formats, overwrite=True
        )
    return written

"""The paper's figures drawn from the series DataFrame (views of the frame; no file reading here).

- :func:`direction_magnitude_figure`: Figure 2 (query) / Figure 7 (value) style, one panel per
  run, x = ΔD, y = ΔM, marker = training step, colour = layer, the least-squares line, and
  Pearson r with its interval and Spearman's rank correlation (from the correlation table) in the
  title, and which interval it is.
- :func:`final_layers_figure`: Figure 3 / 8 style, ΔM and ΔD per layer at each run's final step,
  one line per run.
- :func:`training_curves_figure`: held-out metric (or loss) and training loss per step, per run.

Each figure shows one module of one stack (encoder, decoder, ...): a module name shared by two
stacks (BART's ``self_attn.q_proj``) is two figures, never one pooled cloud. The statistics come
from the table the caller passes; views compute none.

Figures are built inside :func:`~dora_analysis.views.style.figure_style` (seaborn ``whitegrid``, sizes
readable at the width the paper prints them) and saved by :func:`~dora_analysis.views.style.save_figure`
as PNG (200 dpi) and PDF, atomically (both re-exported here). matplotlib is imported inside the
functions, with the ``Agg`` backend (no display needed).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dora_analysis.errors import InputError
from dora_analysis.schema import default_metric, method_label, method_order, module_is, module_mask, points
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

__all__ = [
    "figure_style",
    "direction_magnitude_figure",
    "final_layers_figure",
    "training_curves_figure",
    "save_figure",
    "figure_modules",
    "figure_panels",
    "write_figures",
]

# Filled markers that stay distinct at small sizes; steps beyond eight reuse them.
STEP_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _methods(df: pd.DataFrame) -> list[str]:
    return method_order(df["method"])


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


def _stacks(df: pd.DataFrame) -> list:
    """The stacks of ``df`` in their order (None for rows without one); ``[None]`` without a ``stack`` column."""
    if "stack" not in df.columns:
        return [None]
    return list(dict.fromkeys(None if pd.isna(s) else s for s in df["stack"]))


def _matches(column: pd.Series, value) -> pd.Series:
    """Rows of ``column`` equal to ``value``; a None ``value`` matches missing values."""
    return column.isna() if value is None else column == value


def _select(df: pd.DataFrame, module: str, stack: str | None) -> pd.DataFrame:
    """The rows of one module in one stack. ``module`` is a full module path or its last parts
    (``query`` for ``attention.self.query``, see :func:`~dora_analysis.schema.module_mask`). A module
    found in several stacks needs ``stack``: pooling the encoder's and the decoder's matrices into one
    cloud would be wrong."""
    data = df[module_mask(df["module"], module)]
    if "stack" not in data.columns:
        return data
    present = _stacks(points(data))
    if stack is None and len(present) > 1:
        raise InputError.of(
            module, f"this module is in several stacks ({', '.join(map(str, present))}); pass stack="
        )
    return data[_matches(data["stack"], stack)] if stack is not None else data


def _runs(data: pd.DataFrame) -> list[tuple[str, str | None]]:
    """``(method, run)`` of every run in ``data``, methods in paper order, runs as they appear."""
    if "run" not in data.columns:
        return [(m, None) for m in _methods(data)]
    pairs = dict.fromkeys(zip(data["method"], data["run"], strict=True))
    return [(m, r) for m in _methods(data) for (method, r) in pairs if method == m]


def _run_rows(data: pd.DataFrame, method: str, run: str | None) -> pd.DataFrame:
    rows = data[data["method"] == method]
    return rows if run is None else rows[rows["run"] == run]


def _run_label(method: str, run: str | None, runs: list[tuple[str, str | None]]) -> str:
    """The method's label, with the run's name when the method has several runs."""
    several = sum(m == method for m, _ in runs) > 1
    return f"{method_label(method)} ({run})" if several and run is not None else method_label(method)


def _table_row(table: pd.DataFrame | None, method: str, run, stack, module: str) -> pd.Series | None:
    """The correlation row drawn on a panel: the run's own row, else the row pooling its method's runs."""
    if table is None or table.empty:
        return None
    rows = table[(table["method"] == method) & (table["module"] == module)]
    if "stack" in rows.columns:
        rows = rows[_matches(rows["stack"], stack)]
    if "run" in rows.columns and run is not None:
        own = rows[rows["run"] == run]
        pooled = rows[rows["run"].fillna("").str.split("+").map(lambda names: run in names)]
        rows = own if len(own) else pooled
    return rows.iloc[0] if len(rows) == 1 else None


def _panel_title(label: str, stats: pd.Series | None) -> str:
    """``label: r = +0.23 [-0.10, +0.50]`` and, on the lines below, Spearman's rank correlation and which
    interval that is (the correlation table's ``interval`` column, e.g. ``95% layer jackknife, t(5)``)."""
    if stats is None or not np.isfinite(stats["r"]):
        return label
    interval = ""
    if np.isfinite(stats["r_low"]):
        interval = f" [{stats['r_low']:+.2f}, {stats['r_high']:+.2f}]"
    pooled = " pooled" if stats.get("runs", 1) > 1 else ""
    title = f"{label}: r{pooled} = {stats['r']:+.2f}{interval}"
    second = []
    spearman = stats.get("spearman")
    if spearman is not None and np.isfinite(spearman):
        second.append(f"Spearman {spearman:+.2f}")
    kind = stats.get("interval")
    if interval and isinstance(kind, str):
        second.append(f"({kind} interval)")
    elif not interval and isinstance(stats.get("interval_note"), str):
        second.append("(no interval: too few layers)")
    return "\n".join([title, *second])  # one line each: three panels side by side must not touch


def _stack_of(rows: pd.DataFrame, stack: str | None):
    """The stack of ``rows`` (all in one): ``stack`` when given, else theirs (None without a column)."""
    if stack is not None or "stack" not in rows.columns:
        return stack
    value = rows["stack"].iloc[0]
    return None if pd.isna(value) else value


def _where(module: str, stack: str | None) -> str:
    return module if stack is None else f"{stack} {module}"


def direction_magnitude_figure(
    df: pd.DataFrame, module: str = "query", table: pd.DataFrame | None = None, stack: str | None = None
):
    """Figure 2/7: ΔM against ΔD for one module of one stack, one panel per run.

    Args:
        df: the series (``method``, ``module``, ``step``, ``layer``, ``delta_direction``,
            ``delta_magnitude``; ``run`` and ``stack`` when present).
        module: which matrices (``"query"``, ``"value"``, ``"self_attn.q_proj"``, ...).
        table: :func:`~dora_analysis.correlations` of ``df``; without it the panels carry no r and
            no fitted line (views draw the frame; they compute no statistics). A table made with
            ``pool_runs=True`` puts the pooled r on each of the method's panels.
        stack: which stack (``"encoder"``, ``"decoder"``, ...); needed when ``module`` is in several.
    Returns:
        A matplotlib Figure.
    Raises:
        InputError: no points for ``module`` (in ``stack``), or ``module`` in several stacks and no
            ``stack`` given.
    """
    plt = pyplot()
    data = points(_select(df, module, stack))
    if data.empty:
        raise InputError.of(_where(module, stack), "no analysed points for this module in the series")
    runs = _runs(data)
    steps = sorted(data["step"].unique())
    layers = sorted(data["layer"].dropna().unique())
    colours = layer_colours(layers)
    markers = {s: STEP_MARKERS[i % len(STEP_MARKERS)] for i, s in enumerate(steps)}

    with figure_style():
        width = 3.9 * len(runs) + 1.6  # inches: the panels, then 1.6 in on the right for the two legends
        fig, axes = plt.subplots(1, len(runs), figsize=(width, 3.9), squeeze=False)
        legends_at = 1 - 1.6 / width  # the legends' left edge as a fraction of the width
        for ax, (method, run) in zip(axes[0], runs, strict=True):
            panel = _run_rows(data, method, run)
            stats = _table_row(table, method, run, _stack_of(panel, stack), panel["module"].iloc[0])
            _scatter_panel(ax, panel, markers, colours, stats)
            ax.set_title(_panel_title(_run_label(method, run, runs), stats))
        _step_and_layer_legends(fig, markers, colours, legends_at, width)
        fig.suptitle(
            f"{_where(module, stack)}: magnitude vs direction change (marker = step, colour = layer, "
            "dashed = least-squares fit)",
            fontsize="medium",
        )
        fig.tight_layout(rect=(0, 0, legends_at - 0.005, 0.97))
    return fig


def _scatter_panel(ax, panel: pd.DataFrame, markers: dict, colours: dict, stats: pd.Series | None) -> None:
    """One run's ΔM against ΔD on ``ax`` (marker = step, colour = layer), the table's fitted line, axes."""
    for (step, layer), group in panel.groupby(["step", "layer"], dropna=False):
        ax.scatter(
            group["delta_direction"],
            group["delta_magnitude"],
            marker=markers[step],
            color=colours.get(layer, "0.6"),  # grey: a matrix outside the numbered layers
            s=46,
            edgecolor="black",
            linewidth=0.4,
            zorder=3,
        )
    x = panel["delta_direction"].to_numpy(np.float64)
    y = panel["delta_magnitude"].to_numpy(np.float64)
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
    _format_axis(ax, "x", r"$\Delta D$ (direction change)", x)
    _format_axis(ax, "y", r"$\Delta M$ (magnitude change)", y)


def _legend_handle(marker: str, colour, label: str):
    from matplotlib.lines import Line2D

    return Line2D(
        [],
        [],
        linestyle="",
        marker=marker,
        color=colour,
        markeredgecolor="black",
        markeredgewidth=0.4,
        markersize=7,
        label=label,
    )


def _step_and_layer_legends(fig, markers: dict, colours: dict, legends_at: float, width: float) -> None:
    """The step legend (markers) above the layer legend (colours), right of the panels."""
    top = fig.legend(
        handles=[_legend_handle(markers[s], "0.45", f"{s}") for s in markers],
        title="step",
        loc="upper left",
        bbox_to_anchor=(legends_at, 0.93),
        frameon=False,
    )
    fig.add_artist(top)
    fig.legend(
        handles=[_legend_handle("o", colours[layer], f"{int(layer)}") for layer in colours],
        title="layer",
        loc="upper left",
        ncols=1 if len(colours) <= 8 else 2,
        bbox_to_anchor=(legends_at + 0.8 / width, 0.93),
        frameon=False,
    )


def _run_alpha(method: str, run, runs: list[tuple[str, str | None]]) -> float:
    """Lines of a method's later runs fade a little, so seeds stay apart in one colour."""
    order = [r for m, r in runs if m == method].index(run)
    return max(1.0 - 0.25 * order, 0.4)


def final_layers_figure(df: pd.DataFrame, module: str = "query", stack: str | None = None):
    """Figure 3/8: ΔM (left) and ΔD (right) per layer at each run's final step, one line per run.

    ``stack`` selects the stack (needed when ``module`` is in several, e.g. BART's encoder and
    decoder ``self_attn.q_proj``). A log scale is used when the methods differ by more than 30x
    (full fine-tuning with a small learning rate moves far less than the adapters), so every
    method stays visible; each run's points sit slightly apart around the layer's tick
    (:func:`~dora_analysis.views.style.dodge`), so equal values never hide one another.
    """
    plt = pyplot()
    data = final_step(_select(df, module, stack))
    data = data[np.isfinite(data["delta_direction"]) & np.isfinite(data["delta_magnitude"])]
    if data.empty:
        raise InputError.of(_where(module, stack), "no analysed points for this module in the series")
    runs = _runs(data)
    palette = method_colours(_methods(data))
    with figure_style():
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
        for ax, column, label in (
            (axes[0], "delta_magnitude", r"$\Delta M$"),
            (axes[1], "delta_direction", r"$\Delta D$"),
        ):
            for index, (method, run) in enumerate(runs):
                own = _run_rows(data, method, run)
                rows = own.groupby("layer")[column].mean()
                step = int(own["step"].max())
                linestyle, marker = line_style(method)
                ax.plot(
                    rows.index.astype("float64") + dodge(index, len(runs)),
                    rows.to_numpy(),
                    marker=marker,
                    linestyle=linestyle,
                    color=palette[method],
                    alpha=_run_alpha(method, run, runs),
                    label=f"{_run_label(method, run, runs)} (step {step})",
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
            ax.set_xticks(sorted(data["layer"].dropna().astype("float64").unique()))
            ax.set_title(f"{label} of {_where(module, stack)} per layer")
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)  # outside: lines cross
        fig.tight_layout()
    return fig


def training_curves_figure(history: pd.DataFrame, metric: str | None = None):
    """Held-out metric (left) and training loss (right) per step, one line per run.

    Args:
        history: columns ``method``, ``step``, ``loss`` (``run`` when present) and the metric
            column: when ``metric`` is None the first ``eval_*`` column that is not a loss or a
            timing, else ``eval_loss`` (a Trainer run without ``compute_metrics`` logs only that).
    """
    plt = pyplot()
    metric = metric or default_metric(history.columns)
    if metric is None and "eval_loss" in history.columns and history["eval_loss"].notna().any():
        metric = "eval_loss"
    runs = _runs(history)
    palette = method_colours(_methods(history))
    with figure_style():
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4))
        for ax, column, label in (
            (axes[0], metric, _metric_label(metric)),
            (axes[1], "loss", "training loss"),
        ):
            if column is None or column not in history.columns:
                ax.set_visible(False)
                continue
            for method, run in runs:
                own = _run_rows(history, method, run)
                rows = own[own[column].notna()].sort_values("step")
                linestyle, marker = line_style(method)
                ax.plot(
                    rows["step"],
                    rows[column],
                    marker=marker if len(rows) <= 25 else None,
                    linestyle=linestyle,
                    markersize=5,
                    color=palette[method],
                    alpha=_run_alpha(method, run, runs),
                    label=_run_label(method, run, runs),
                    linewidth=1.6,
                    markerfacecolor="none" if method == "lora" else palette[method],
                )
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.set_title(label)
        visible = [ax for ax in axes if ax.get_visible()]
        if visible:
            visible[0].legend(frameon=True, fontsize="small")
        fig.tight_layout()
    return fig


def _metric_label(metric: str | None) -> str:
    if metric is None:
        return ""
    return "held-out " + metric.removeprefix("eval_").replace("_", " ")


#: The paper's query and value matrices, by the last part of the module path (BERT ``query``,
#: BART/LLaMA ``q_proj``, T5 ``q``), in the order the figures are drawn.
PAPER_MODULE_NAMES = ("query", "value", "q_proj", "v_proj", "q", "v")


def figure_modules(df: pd.DataFrame) -> list[str]:
    """The modules to draw by default: the query and value matrices as in the paper, else every module.

    A paper name that ends exactly one module is given as that name (``query`` for
    ``attention.self.query``, so the files stay ``direction_magnitude_query``); one that ends several
    (BART's ``q_proj``: ``self_attn.q_proj`` and ``encoder_attn.q_proj``) as each full module path.
    This only chooses which figures to draw; every module is in the correlation table.
    """
    present = list(dict.fromkeys(points(df)["module"]))
    chosen: list[str] = []
    for name in PAPER_MODULE_NAMES:
        found = [m for m in present if module_is(m, name)]
        chosen += [name] if len(found) == 1 else [m for m in found if m not in chosen]
    return chosen or present


def _file_part(name: str) -> str:
    """``name`` made safe as part of a file name (letters, digits, ``_``, ``-`` and ``.`` kept)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def figure_panels(series: pd.DataFrame, modules: Sequence[str]) -> list[tuple[str | None, str]]:
    """``(stack, module)`` of every figure to draw: each module in each stack where it has points.

    ``module`` as given (a full path or its last parts); ``stack`` is None for a series without stacks.
    """
    data = points(series)
    pairs = []
    for module in modules:
        rows = data[module_mask(data["module"], module)]
        pairs += [(stack, module) for stack in _stacks(rows)]
    return pairs


def _figure_name(kind: str, stack: str | None, module: str, with_stack: bool) -> str:
    parts = [kind] + ([stack] if with_stack and stack is not None else []) + [module]
    return "_".join(_file_part(p) for p in parts)


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
    and ``training_curves`` (when ``history`` is given), each in ``formats``. In a series with
    stacks (BART, T5, vision-language models) each stack holding the module gets its own files,
    ``direction_magnitude_<stack>_<module>`` and ``final_layers_<stack>_<module>``: the encoder's
    and the decoder's matrices are never one cloud (the stack is in the file names when the figures
    span more than one stack). ``table`` (:func:`~dora_analysis.correlations`
    of ``series``) puts r and the fitted line on the panels.

    Returns:
        ``{figure name: [written paths]}`` in the order drawn.
    Raises:
        InputError: a target exists and ``overwrite`` is False (checked before anything is drawn).
    """
    out = Path(out_dir)
    modules = list(modules) if modules is not None else figure_modules(series)
    panels = figure_panels(series, modules)
    with_stack = len({stack for stack, _ in panels}) > 1  # the stack is in the names when they differ
    names = [_figure_name("direction_magnitude", st, m, with_stack) for st, m in panels]
    names += [_figure_name("final_layers", st, m, with_stack) for st, m in panels]
    if history is not None and not history.empty:
        names.append("training_curves")
    if not overwrite:
        refuse_existing_figures(out, names, formats)
    written: dict[str, list[Path]] = {}
    for stack, module in panels:
        fig = direction_magnitude_figure(series, module, table, stack=stack if with_stack else None)
        name = _figure_name("direction_magnitude", stack, module, with_stack)
        written[name] = save_figure(fig, out / name, formats, overwrite=True)
    for stack, module in panels:
        fig = final_layers_figure(series, module, stack=stack if with_stack else None)
        name = _figure_name("final_layers", stack, module, with_stack)
        written[name] = save_figure(fig, out / name, formats, overwrite=True)
    if "training_curves" in names:
        written["training_curves"] = save_figure(
            training_curves_figure(history), out / "training_curves", formats, overwrite=True
        )
    return written

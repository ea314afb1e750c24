"""The study's views: the sign map (r by configuration and convention, per method), the row-by-row r
over the steps, and report.md.

They consume the study's tables (``study.csv`` and ``row_coupling_steps.csv``, see ``jobs/study.py``);
nothing here computes a statistic.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dora_analysis.schema import method_label, method_order
from dora_analysis.views.report import PAPER_R, interval_text, markdown_table
from dora_analysis.views.style import figure_style, line_style, method_colours, pyplot, save_figure

__all__ = [
    "configuration_labels",
    "sign_map_figure",
    "write_sign_maps",
    "row_coupling_figure",
    "write_row_coupling_figures",
    "sign_flips",
    "render_study_report",
]


def configuration_labels(table: pd.DataFrame) -> pd.Series:
    """One label per row: ``base (paper window)``, ``weight decay: 0.1``, ... in the table's order."""
    base = table["cell"] == "base"
    return pd.Series(
        np.where(base, "base, " + table["window"] + " window", table["factor"] + ": " + table["value"]),
        index=table.index,
    )


def sign_map_figure(table: pd.DataFrame, module: str = "query"):
    """r of ΔM on ΔD for one module: rows = configurations, columns = conventions, a panel per method.

    Each cell shows the r pooled over seeds and, below it, ``seeds a..b``: the range of the seeds' own
    r. Red is positive (LoRA's sign in the paper), blue negative (FT's and DoRA's); each panel's title
    gives the paper's r for that method. A configuration that does not apply to a method (targets and
    rank for FT, the DoRA-only arms for FT and LoRA) is hatched grey and marked ``n/a``, and one where r
    is not defined (a ΔD or ΔM that does not vary, as magnitude-only DoRA's ΔD = 0) ``r undefined``:
    neither is drawn as r = 0.
    """
    plt = pyplot()
    data = table[table["module"] == module].assign(configuration=lambda t: configuration_labels(t))
    methods = method_order(data["method"])
    rows = list(dict.fromkeys(data["configuration"]))
    conventions = list(dict.fromkeys(data["convention"]))
    with figure_style():
        fig, axes = plt.subplots(
            1,
            len(methods),
            figsize=(1.6 + 1.9 * len(conventions) * len(methods), 1.4 + 0.55 * len(rows)),
            squeeze=False,
            sharey=True,
        )
        for ax, method in zip(axes[0], methods, strict=True):
            image = _sign_panel(ax, data[data["method"] == method], rows, conventions)
            paper = PAPER_R.get(method)
            ax.set_title(method_label(method) + (f" (paper: r = {paper:+.2f})" if paper is not None else ""))
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="Pearson r of ΔM on ΔD, pooled over seeds")
        fig.suptitle(f"When does the paper's sign appear? ({module}; second line: the seeds' own r)", y=1.06)
    return fig


def _sign_panel(ax, part: pd.DataFrame, rows: list[str], conventions: list[str]):
    """One method's grid: r per (configuration, convention), the seeds' range below; n/a cells hatched."""
    part = part.set_index(["configuration", "convention"])
    grid = np.full((len(rows), len(conventions)), np.nan)
    for i, row in enumerate(rows):
        for j, convention in enumerate(conventions):
            if (row, convention) not in part.index:
                ax.add_patch(_not_applicable(j, i))
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="0.35")
                continue
            stats = part.loc[(row, convention)]
            if not np.isfinite(stats["r"]):  # no r at all (e.g. magnitude-only DoRA: ΔD = 0 exactly)
                ax.add_patch(_not_applicable(j, i))
                ax.text(j, i, "r undefined", ha="center", va="center", fontsize=7, color="0.35")
                continue
            grid[i, j] = stats["r"]
            label = f"{stats['r']:+.2f}"
            if stats["seeds"] > 1 and np.isfinite(stats["r_seed_min"]):
                label += f"\nseeds {stats['r_seed_min']:+.2f}..{stats['r_seed_max']:+.2f}"
            dark = abs(stats["r"]) > 0.55  # the colour map is dark at both ends
            ax.text(j, i, label, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(
        range(len(conventions)), [c.replace("_", " ") for c in conventions], rotation=30, ha="right"
    )
    ax.set_yticks(range(len(rows)), rows)
    ax.grid(False)
    return image


def _not_applicable(column: int, row: int):
    from matplotlib.patches import Rectangle

    return Rectangle((column - 0.5, row - 0.5), 1, 1, facecolor="0.92", hatch="///", edgecolor="0.7", lw=0)


def write_sign_maps(
    table: pd.DataFrame,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("png", "pdf"),
    overwrite: bool = False,
) -> dict[str, list[Path]]:
    """``sign_map_<module>`` for every module in ``table``; returns ``{name: [paths]}``."""
    drawings = {
        f"sign_map_{m}": lambda m=m: sign_map_figure(table, m) for m in dict.fromkeys(table["module"])
    }
    return _save_each(drawings, out_dir, formats, overwrite)


def _save_each(drawings: dict, out_dir: str | os.PathLike, formats: Sequence[str], overwrite: bool) -> dict:
    """Draw, save (``out_dir/<name>.<format>``) and close each figure of ``{name: draw}`` in turn, so one
    figure at a time is open; returns ``{name: [paths]}``."""
    written = {}
    for name, draw in drawings.items():
        fig = draw()
        written[name] = save_figure(fig, Path(out_dir) / name, formats, overwrite)
        pyplot().close(fig)
    return written


_ROW_KINDS = (("abs", "|Δm_n|"), ("signed", "signed Δm_n"))


def row_coupling_figure(steps: pd.DataFrame, cell: str = "base"):
    """The row-by-row r of one configuration over the training steps: rows = modules, columns = |Δm_n|
    and signed Δm_n, one line per method with its interval as a band.

    ``steps`` is ``row_coupling_steps.csv``: within each matrix and step, Pearson r over the matrix's
    rows n of the magnitude change with 1 - cos_n, averaged over layers and seeds on Fisher's z scale;
    the band is its 95% delete-one-layer jackknife t interval (absent where there is none).
    """
    plt = pyplot()
    data = steps[steps["cell"] == cell]
    modules = list(dict.fromkeys(data["module"]))
    methods = method_order(data["method"])
    palette = method_colours(methods)
    with figure_style():
        fig, axes = plt.subplots(
            len(modules), 2, figsize=(10.5, 3.0 * len(modules) + 0.6), squeeze=False, sharex=True
        )
        for row, module in enumerate(modules):
            for column, (kind, label) in enumerate(_ROW_KINDS):
                ax = axes[row][column]
                for method in methods:
                    part = data[(data["module"] == module) & (data["method"] == method)].sort_values("step")
                    _row_line(ax, part, kind, method, palette[method])
                ax.axhline(0.0, color="0.3", linewidth=0.8)
                ax.set_ylim(-1.05, 1.05)
                ax.set_title(f"{module}: r of {label} with 1 - cos_n", fontsize="medium")
                ax.set_ylabel("r over the matrix's rows")
        for ax in axes[-1]:
            ax.set_xlabel("step")
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        layers = int(data["layers"].max()) if len(data) else 0
        fig.suptitle(
            f"{cell}: within each matrix, r over its rows; mean over layers and seeds (Fisher z); "
            f"band: 95% layer jackknife t({layers - 1})",
            fontsize="medium",
        )
        fig.tight_layout()
    return fig


def _row_line(ax, part: pd.DataFrame, kind: str, method: str, colour) -> None:
    linestyle, marker = line_style(method)
    steps = part["step"].to_numpy(np.float64)
    ax.plot(
        steps,
        part[f"r_{kind}"],
        linestyle=linestyle,
        marker=marker,
        color=colour,
        label=method_label(method),
        markerfacecolor="none" if method == "lora" else colour,
    )
    ax.fill_between(steps, part[f"r_{kind}_low"], part[f"r_{kind}_high"], color=colour, alpha=0.15, lw=0)


def write_row_coupling_figures(
    steps: pd.DataFrame,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("png", "pdf"),
    overwrite: bool = False,
) -> dict[str, list[Path]]:
    """``row_coupling_<cell>`` for every configuration in ``steps`` with a defined r (none where ΔD
    does not vary within a matrix, as magnitude-only DoRA's); returns ``{name: [paths]}``."""
    defined = steps[steps[["r_abs", "r_signed"]].notna().any(axis=1)]
    drawings = {
        f"row_coupling_{c}": lambda c=c: row_coupling_figure(steps, c) for c in dict.fromkeys(defined["cell"])
    }
    return _save_each(drawings, out_dir, formats, overwrite)


def sign_flips(table: pd.DataFrame, module: str = "query", convention: str = "paper") -> pd.DataFrame:
    """Configurations whose r has the other sign than the base's (paper window), with their intervals.

    ``decided`` is True where the interval of the configuration excludes zero, so the flip is not
    within the noise.
    """
    data = table[(table["module"] == module) & (table["convention"] == convention)]
    base = data[(data["cell"] == "base") & (data["window"] == "paper")].set_index("method")["r"]
    rows = []
    for row in data.itertuples(index=False):
        if row.method not in base.index or (row.cell == "base" and row.window == "paper"):
            continue
        if not np.isfinite(row.r):  # no r: no sign to compare
            continue
        if np.sign(row.r) != np.sign(base[row.method]):
            rows.append(
                {
                    "method": row.method,
                    "configuration": configuration_labels(pd.DataFrame([row._asdict()])).iloc[0],
                    "base r": base[row.method],
                    "r": row.r,
                    "interval": f"[{row.r_low:+.2f}, {row.r_high:+.2f}]",
                    "decided": bool(row.r_low > 0 or row.r_high < 0),
                }
            )
    return pd.DataFrame(rows, columns=["method", "configuration", "base r", "r", "interval", "decided"])


def _with_spread(row: pd.Series) -> str:
    if not math.isfinite(row["r"]):
        return "-"
    text = f"{row['r']:+.2f} [{row['r_low']:+.2f}, {row['r_high']:+.2f}]"
    if row["seeds"] > 1:
        text += f" (seeds {row['r_seed_min']:+.2f}..{row['r_seed_max']:+.2f})"
    return text


def _coupling_section(paper: pd.DataFrame, module: str) -> list[str]:
    """The same configurations apart from the growth every matrix shares: r of the step-to-step
    increments, and the row-by-row r within each matrix at the window's last step (paper convention)."""
    if "r_increments" not in paper.columns:
        return []
    lines = [f"### {module}: apart from shared growth", ""]
    lines += [
        "Each cell: r of the step-to-step increments of ΔM and ΔD; r with ΔM relative to the matrix's mean",
        "base magnitude; then the row-by-row r of abs(Δm_n) and of the signed Δm_n with 1 - cos_n within",
        "each matrix at the window's last step, pooled over layers and seeds. Every interval: 95%",
        "delete-one-layer jackknife t.",
        "",
    ]
    text = paper.apply(
        lambda row: (
            f"increments {interval_text(row, 'r_increments')}; relative "
            f"{interval_text(row, 'r_relative')}; rows abs(Δm) "
            f"{interval_text(row, 'r_rows_abs')}, signed {interval_text(row, 'r_rows_signed')}"
        ),
        axis=1,
    )
    wide = paper.assign(text=text).pivot_table(
        index="configuration", columns="method", values="text", aggfunc="first", sort=False
    )
    wide = wide[[m for m in method_order(wide.columns)]].rename(columns=method_label).reset_index()
    return lines + [markdown_table(wide), ""]


def render_study_report(
    table: pd.DataFrame,
    figures: Mapping[str, Sequence[Path]] | None = None,
    relative_to: str | os.PathLike | None = None,
    context: Sequence[str] = (),
) -> str:
    """report.md of the study: the summary table, the sign flips, the conventions, the sign maps."""
    lines = ["# When does the paper's sign appear?", ""]
    lines += [f"- {line}" for line in context] + [""]
    lines += [
        "Paper (VL-BART, query): FT r = -0.62, LoRA +0.83, DoRA -0.31. Each cell below: Pearson r of ΔM",
        "on ΔD pooled over layers, checkpoints and seeds [95% delete-one-layer jackknife t interval, a",
        "layer index left out of every seed at once] (the range of the seeds' own r).",
        "",
    ]
    for module in dict.fromkeys(table["module"]):
        paper = table[(table["module"] == module) & (table["convention"] == "paper")].copy()
        paper["configuration"] = configuration_labels(paper)
        paper["text"] = paper.apply(_with_spread, axis=1)
        wide = paper.pivot_table(
            index="configuration", columns="method", values="text", aggfunc="first", sort=False
        )
        wide = wide[[m for m in method_order(wide.columns)]].rename(columns=method_label).reset_index()
        lines += [f"## {module}: the paper's convention", "", markdown_table(wide), ""]
        lines += _coupling_section(paper, module)
        flips = sign_flips(table, module)
        lines += [f"### {module}: configurations whose sign differs from the base's", ""]
        lines += [
            markdown_table(flips) if not flips.empty else "None: every configuration keeps the base's sign.",
            "",
        ]
        base = table[
            (table["module"] == module) & (table["cell"] == "base") & (table["window"] == "paper")
        ].copy()
        base["text"] = base.apply(_with_spread, axis=1)
        conventions = base.pivot_table(
            index="convention", columns="method", values="text", aggfunc="first", sort=False
        )
        conventions = conventions[[m for m in method_order(conventions.columns)]].rename(columns=method_label)
        lines += [f"### {module}: the same base runs measured the ways public scripts did", ""]
        lines += [markdown_table(conventions.reset_index()), ""]
    for name, paths in (figures or {}).items():
        png = [p for p in paths if Path(p).suffix == ".png"]
        if png:
            target = Path(png[0])
            shown = os.path.relpath(target, relative_to) if relative_to else str(target)
            lines += [f"![{name}]({shown})", ""]
    return "\n".join(lines)

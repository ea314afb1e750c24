"""report.md: the accuracy per method, the correlation table against the paper's, the figures.

Pure text from DataFrames (:func:`render_report`); :func:`write_report` writes it atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dora_analysis.schema import method_label, method_order, module_is, module_mask

__all__ = [
    "PAPER_R",
    "accuracy_table",
    "interval_text",
    "markdown_table",
    "paper_comparison",
    "render_report",
    "write_report",
]

#: Pearson r of (ΔD, ΔM) the paper reports (Section 3.2, Figure 2, query matrices of VL-BART).
PAPER_R = {"ft": -0.62, "lora": 0.83, "dora": -0.31}


def accuracy_table(history: pd.DataFrame, metric: str = "eval_accuracy") -> pd.DataFrame:
    """Per run: the metric before training (step 0), at the last step, and the best, with steps.

    Args:
        history: :func:`dora_analysis.readers.runs.training_history` (``run``, ``method``, ``step``, ``metric``).
    Returns:
        Columns ``method``, ``run``, ``steps``, ``untrained``, ``final``, ``best``, ``best_step``;
        methods in paper order.
    """
    rows = []
    if metric not in history.columns:
        return pd.DataFrame(columns=["method", "run", "steps", "untrained", "final", "best", "best_step"])
    for run, group in history[history[metric].notna()].groupby("run", sort=False):
        group = group.sort_values("step")
        at_zero = group.loc[group["step"] == 0, metric]
        best = group.loc[group[metric].idxmax()]
        rows.append(
            {
                "method": group["method"].iloc[0],
                "run": run,
                "steps": int(group["step"].max()),
                "untrained": float(at_zero.iloc[0]) if len(at_zero) else math.nan,
                "final": float(group[metric].iloc[-1]),
                "best": float(best[metric]),
                "best_step": int(best["step"]),
            }
        )
    table = pd.DataFrame(rows, columns=["method", "run", "steps", "untrained", "final", "best", "best_step"])
    rank = {m: i for i, m in enumerate(method_order(table["method"]))}
    return table.sort_values("method", key=lambda s: s.map(rank), kind="stable").reset_index(drop=True)


def paper_comparison(table: pd.DataFrame, module: str = "query") -> pd.DataFrame:
    """Our pooled r for ``module`` beside the paper's, and whether the sign (and value) reproduce.

    One row per method with no data, else one per row of ``table`` for that method and module
    (each run and stack of it). Columns ``method``, ``run``, ``stack`` (None when the table has
    none), ``paper_r``, ``our_r``, ``r_low``, ``r_high``, ``verdict``: ``"reproduced"`` (same sign
    and the paper's value inside our 95% interval), ``"same sign"`` (same sign, the paper's value
    outside the interval), ``"not reproduced"`` (opposite sign or zero), ``"no data"``.
    """
    rows = []
    for method, paper in PAPER_R.items():
        ours = table[(table["method"] == method) & module_mask(table["module"], module)]
        ours = ours[np.isfinite(ours["r"].astype("float64"))]
        if ours.empty:
            rows.append(
                {
                    "method": method,
                    "run": None,
                    "stack": None,
                    "paper_r": paper,
                    "our_r": math.nan,
                    "r_low": math.nan,
                    "r_high": math.nan,
                    "verdict": "no data",
                }
            )
            continue
        for _, row in ours.iterrows():
            r, low, high = (float(row[c]) for c in ("r", "r_low", "r_high"))
            if np.sign(r) != np.sign(paper):
                verdict = "not reproduced"
            elif np.isfinite(low) and low <= paper <= high:
                verdict = "reproduced"
            else:
                verdict = "same sign"
            rows.append(
                {
                    "method": method,
                    "run": _value(row, "run"),
                    "stack": _value(row, "stack"),
                    "paper_r": paper,
                    "our_r": r,
                    "r_low": low,
                    "r_high": high,
                    "verdict": verdict,
                }
            )
    return pd.DataFrame(rows)


def _value(row: pd.Series, column: str):
    """``row[column]``, None when the column is absent or the value missing."""
    value = row.get(column)
    return None if value is None or pd.isna(value) else value


def _shown_columns(frame: pd.DataFrame) -> list[str]:
    """Which of ``run`` and ``stack`` a table needs: ``stack`` when its rows span several stacks,
    ``run`` when a method has several runs (or pooled ones); one run per method is named by the method."""
    shown = []
    if "run" in frame.columns and frame["run"].notna().any():
        per_method = frame.dropna(subset=["run"]).groupby("method")["run"].nunique()
        pooled = frame["run"].fillna("").astype(str).str.contains("+", regex=False).any()
        if (per_method > 1).any() or pooled:
            shown.append("run")
    if "stack" in frame.columns and frame["stack"].notna().any() and frame["stack"].nunique(dropna=False) > 1:
        shown.append("stack")
    return shown


def markdown_table(frame: pd.DataFrame, formats: Mapping[str, str] | None = None) -> str:
    """A GitHub markdown table; float columns formatted with ``formats[col]`` (default ``.4g``)."""
    formats = dict(formats or {})

    def cell(column: str, value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float | np.floating):
            return format(float(value), formats.get(column, ".4g"))
        return str(value)

    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = [
        "| " + " | ".join(cell(c, v) for c, v in zip(frame.columns, row, strict=True)) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])


def interval_text(row: pd.Series, name: str = "r", number: str = "+.2f") -> str:
    """``value [low, high]`` of statistic ``name`` of a correlation row (the value alone where the row has
    no interval for it, ``-`` where there is no value)."""
    value = row.get(name)
    if value is None or not np.isfinite(value):
        return "-"
    low, high = row.get(f"{name}_low"), row.get(f"{name}_high")
    if low is None or not np.isfinite(low):
        return f"{value:{number}}"
    return f"{value:{number}} [{low:{number}}, {high:{number}}]"


def _correlation_markdown(table: pd.DataFrame) -> str:
    extra = _shown_columns(table)
    columns = {"method": table["method"].map(method_label)}
    columns.update({c: table[c].where(table[c].notna(), "-") for c in extra})
    columns.update(
        {
            "module": table["module"],
            "n": table["n"],
            "steps x layers": [
                f"{s} x {lay}" for s, lay in zip(table["steps"], table["layers"], strict=True)
            ],
            "r [95% CI]": [interval_text(row) for _, row in table.iterrows()],
        }
    )
    rows = [row for _, row in table.iterrows()]
    if "spearman" in table.columns:
        columns["Spearman"] = [interval_text(row, "spearman") for row in rows]
    columns.update(
        {
            "slope": [interval_text(row, "slope", ".3g") for row in rows],
            "r within step": [interval_text(row, "r_within_step") for row in rows],
            "r within layer": [interval_text(row, "r_within_layer") for row in rows],
            "paper r": [
                PAPER_R.get(m, math.nan) if module_is(mod, "query") else math.nan
                for m, mod in zip(table["method"], table["module"], strict=True)
            ],
        }
    )
    return markdown_table(
        pd.DataFrame(columns),
        {"paper r": "+.2f"},
    )


def _interval_text(table: pd.DataFrame) -> str:
    """How the intervals in ``table`` were made, from its ``bootstrap`` column."""
    kinds = set(table["bootstrap"].dropna()) if "bootstrap" in table.columns else set()
    if kinds == {"layer-jackknife"}:
        return (
            "a 95% delete-one-layer jackknife t interval beside each statistic: it is recomputed with one "
            "layer index left out of every run at once (the seeds share their pre-trained layers, and the "
            "steps of one matrix are dependent, so the layers are the independent units), and the spread "
            "of those values gives a Student's t interval with (layers - 1) degrees of freedom, "
            "correlations on Fisher's z; with fewer than 3 layers there is no interval"
        )
    if kinds <= {"layers", "layers-within-run"} and kinds:
        return (
            "a 95% percentile cluster-bootstrap interval that resamples whole layers (every step of "
            "one weight matrix together, with replacement, within each run; 2000 resamples, seed 0), "
            "because the same matrix at successive steps is not an independent point; with fewer "
            "than 3 layers there is no interval"
        )
    if kinds == {"points"}:
        return (
            "a 95% percentile bootstrap interval that resamples points as if independent (2000 "
            "resamples, seed 0; too narrow, since the same matrix at successive steps is dependent)"
        )
    return "a 95% percentile bootstrap interval"


def _final_step_markdown(series: pd.DataFrame, modules: Sequence[str]) -> str:
    key = "run" if "run" in series.columns else "method"
    last = series[series["step"] == series.groupby(key)["step"].transform("max")]
    last = last[np.logical_or.reduce([module_mask(last["module"], m) for m in modules])]
    by = ["method"]
    if "run" in last.columns:
        by.append("run")
    if "stack" in last.columns and last["stack"].notna().any():
        by.append("stack")
    by.append("module")
    summary = (
        last.groupby(by, sort=False, dropna=False)[["delta_magnitude", "delta_direction"]]
        .mean()
        .reset_index()
    )
    rank = {m: i for i, m in enumerate(method_order(summary["method"]))}
    keys = {"_rank": summary["method"].map(rank)}
    for column in by[1:-1]:  # runs and stacks in the series' order
        order = {v: i for i, v in enumerate(dict.fromkeys(last[column].astype(str)))}
        keys[f"_{column}"] = summary[column].astype(str).map(order)
    summary = summary.assign(**keys).sort_values([*keys, "module"], kind="stable")
    summary = summary[
        [
            "method",
            *[c for c in _shown_columns(summary) if c in by],
            "module",
            "delta_magnitude",
            "delta_direction",
        ]
    ]
    summary["method"] = summary["method"].map(method_label)
    summary = summary.rename(columns={"delta_magnitude": "mean ΔM", "delta_direction": "mean ΔD"})
    return markdown_table(summary, {"mean ΔM": ".3g", "mean ΔD": ".3g"})


def render_report(
    series: pd.DataFrame,
    table: pd.DataFrame,
    accuracy: pd.DataFrame,
    figures: Mapping[str, Sequence[Path]] | None = None,
    relative_to: str | os.PathLike | None = None,
    context: Sequence[str] = (),
    majority_accuracy: float | None = None,
    sections: Sequence[str] = (),
) -> str:
    """The markdown text of report.md.

    Args:
        series: :func:`~dora_analysis.analyze_series`.
        table: :func:`~dora_analysis.analysis.correlations` of ``series``.
        accuracy: :func:`accuracy_table`.
        figures: ``{name: [paths]}`` from :func:`dora_analysis.views.figures.write_figures`; PNGs are embedded.
        relative_to: the report's folder, so figure links are relative to it.
        context: lines describing the run (model, task, steps, time), shown as a list.
        majority_accuracy: the held-out accuracy of always answering the commonest label.
        sections: further markdown sections (e.g. the update's spectrum), placed before the figures.
    """
    out: list[str] = ["# DoRA weight-decomposition analysis", ""]
    if context:
        out += [f"- {line}" for line in context] + [""]
    out += _accuracy_section(accuracy, majority_accuracy)
    out += _correlation_section(table)
    out += _paper_section(table)
    out += _final_step_section(series, table)
    out += [section.rstrip() + "\n" for section in sections if section]
    out += _figures_section(figures, relative_to)
    return "\n".join(out).rstrip() + "\n"


def _accuracy_section(accuracy: pd.DataFrame, majority_accuracy: float | None) -> list[str]:
    out = ["## Accuracy per method", ""]
    if accuracy.empty:
        return out + ["(no evaluation was logged)", ""]
    shown = accuracy.assign(method=accuracy["method"].map(method_label))
    out += [markdown_table(shown, {c: ".3f" for c in ("untrained", "final", "best")}), ""]
    if majority_accuracy is not None:
        out += [f"Always answering the commonest label scores {majority_accuracy:.3f}.", ""]
    return out


def _correlation_section(table: pd.DataFrame) -> list[str]:
    return [
        "## Correlation of magnitude and direction change",
        "",
        "One point per weight matrix per checkpoint: x = ΔD (mean 1 - cos per output unit), y = ΔM (mean "
        "|m - m0| per output unit). One row per run, stack and module: matrices of different stacks "
        "(encoder, decoder, ...) or runs (seeds) are never pooled unless a row names several runs. "
        f"`r` is Pearson's r pooled over all layers and steps, with {_interval_text(table)}; "
        "`Spearman` is the rank correlation of the same points; `slope` is the least-squares slope of ΔM "
        "on ΔD; `r within step` / `r within layer` are r after centring both on their per-step / "
        "per-layer means within each run (between-layer differences vs. joint movement over training).",
        "",
        _correlation_markdown(table),
        "",
    ]


def _paper_section(table: pd.DataFrame) -> list[str]:
    """Our r of the query matrices against the paper's, one line per method (and run or stack)."""
    comparison = paper_comparison(table)
    if comparison.empty:
        return []
    out = ["### Against the paper (query matrices, Figure 2)", ""]
    several = comparison["method"].value_counts()
    stacks = comparison.loc[comparison["verdict"] != "no data", "stack"].nunique(dropna=False)
    for row in comparison.itertuples(index=False):
        if row.verdict == "no data":
            out.append(f"- {method_label(row.method)}: paper r = {row.paper_r:+.2f}; no data here.")
            continue
        run = row.run if several[row.method] > 1 else None
        where = [str(p) for p in (run, row.stack if stacks > 1 else None) if p is not None]
        label = method_label(row.method) + (f" ({', '.join(where)})" if where else "")
        out.append(
            f"- {label}: paper r = {row.paper_r:+.2f}, ours r = {row.our_r:+.2f} "
            f"[{row.r_low:+.2f}, {row.r_high:+.2f}]: **{row.verdict}**."
        )
    return out + [""]


def _final_step_section(series: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    modules = sorted(set(table["module"])) if not table.empty else []
    paper_modules = [m for m in ("query", "value") if any(module_is(x, m) for x in modules)] or modules
    if not (len(series) and paper_modules):
        return []
    return ["## Change at the final step (Figure 3 / 8)", "", _final_step_markdown(series, paper_modules), ""]


def _figures_section(
    figures: Mapping[str, Sequence[Path]] | None, relative_to: str | os.PathLike | None
) -> list[str]:
    """Each figure's PNG embedded under its name, linked relative to the report's folder."""
    if not figures:
        return []
    out = ["## Figures", ""]
    base = Path(relative_to) if relative_to is not None else None
    for name, paths in figures.items():
        png = [p for p in paths if Path(p).suffix == ".png"]
        if not png:
            continue
        link = Path(png[0])
        if base is not None:
            link = Path(os.path.relpath(link, base))
        out += [f"### {name.replace('_', ' ')}", "", f"![{name}]({link.as_posix()})", ""]
    return out


def write_report(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically; refuses to replace a file unless ``overwrite``."""
    from dora_analysis.views.tables import atomic_write

    return atomic_write(path, text, overwrite=overwrite)

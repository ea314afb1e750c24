"""The report's section on the shape of the update: a table per method and module, and what it means.

Pure text from a series analysed with ``metrics="spectrum,intruders"`` (see
:mod:`dora_analysis.analysis.spectrum`); :func:`spectrum_table` is the table as a DataFrame.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from dora_analysis.schema import RANK90_LOWER, RANK90_UPPER, method_label, method_order, select_modules

__all__ = ["spectrum_table", "spectrum_section"]

_MEANS = {
    "update_rel_norm": "rel. norm",
    "update_stable_rank": "stable rank",
    "update_effective_rank": "effective rank",
    "update_rank90": "rank90",
    "update_top_singular": "σ1",
    RANK90_LOWER: "rank90 (lower bound)",
    RANK90_UPPER: "rank90 (upper bound)",
    "intruder_dimensions": "intruders per matrix",
}


def spectrum_table(series: pd.DataFrame, modules: Sequence[str] = ("query", "value")) -> pd.DataFrame:
    """Per method and module at each run's final step: the mean over layers of the spectral columns,
    the total intruder count, and the mean ``subspace_to_final`` at the run's first checkpoint.

    Returns:
        Columns ``method``, ``module``, ``layers``, ``shape`` and one per column present; methods in
        paper order.
    """
    data = select_modules(series, modules).dropna(subset=["step"])
    key = "run" if "run" in data.columns else "method"
    last = data[data["step"] == data.groupby(key)["step"].transform("max")]
    first = data[data["step"] == data.groupby(key)["step"].transform("min")]
    present = [c for c in _MEANS if c in data.columns]
    if RANK90_LOWER in data.columns and (data[RANK90_LOWER] == data[RANK90_UPPER]).all():
        present = [c for c in present if c not in (RANK90_LOWER, RANK90_UPPER)]  # exact: rank90 says it
    rows = []
    for (method, module), group in last.groupby(["method", "module"], sort=False):
        row = {
            "method": method,
            "module": module,
            "layers": int(group["layer"].nunique()),
            "shape": ", ".join(sorted(set(group["shape"].astype(str)))),
        }
        for column in present:
            row[column] = float(group[column].mean())
        if "intruder_dimensions" in present:
            row["intruders total"] = int(group["intruder_dimensions"].sum())
        if "subspace_to_final" in data.columns:
            start = first[(first["method"] == method) & (first["module"] == module)]
            row["φ first→final"] = float(start["subspace_to_final"].mean()) if len(start) else np.nan
            row["first step"] = int(start["step"].min()) if len(start) else None
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    rank = {m: i for i, m in enumerate(method_order(table["method"]))}
    return table.sort_values(
        ["method", "module"], key=lambda s: s.map(rank) if s.name == "method" else s, kind="stable"
    ).reset_index(drop=True)


def spectrum_section(series: pd.DataFrame, modules: Sequence[str] = ("query", "value")) -> str:
    """The markdown section: the table, how to read it, and the published findings beside it."""
    from dora_analysis.views.report import markdown_table

    table = spectrum_table(series, modules)
    if table.empty:
        return ""
    shown = table.assign(method=table["method"].map(method_label)).rename(columns=_MEANS)
    text = [
        "## The shape of the update (beyond the paper)",
        "",
        "Per weight matrix, the update ΔW = W_t - W_0 of the merged weights at each run's final step, "
        "averaged over layers: relative norm ||ΔW||_F / ||W_0||_F, stable rank ||ΔW||_F² / σ1², "
        "effective rank (exp of the entropy of σ_i / Σσ), rank90 (singular values needed for 90% of "
        "||ΔW||_F²), σ1, and intruder dimensions (of the top 10 left singular vectors of W_t, those "
        "with |cos| < 0.5 to every left singular vector of W_0; Shuttleworth et al. 2024), also summed "
        "over layers. `φ first→final` is the LoRA paper's subspace similarity of the top-8 left "
        "singular vectors of the update at the first checkpoint and at the final one.",
        "",
        markdown_table(
            shown,
            {
                "rel. norm": ".3g",
                "stable rank": ".3g",
                "effective rank": ".3g",
                "rank90": ".3g",
                "σ1": ".3g",
                "intruders per matrix": ".2f",
                "φ first→final": ".2f",
            },
        ),
        "",
        "Published findings to read it against: full fine-tuning updates are high rank (Biderman et "
        "al. 2024: rank90 of 1000-2800 on 4096² matrices, 10-100x typical LoRA ranks); LoRA's are low "
        "rank by construction (rank90 <= r) and bring intruder dimensions that full fine-tuning does "
        "not (Shuttleworth et al. 2024, on much longer runs than ours).",
        "",
    ]
    return "\n".join(text)

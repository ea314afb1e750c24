"""The contract between the analysis and its views: the frames' columns, the metric groups, the row
order, the methods, the logged metrics, the points.

Training writes these names, the analysis builds its frames from them and the views label and filter
by them; each exists here once, so a new method, metric or column is added in one place. Pure pandas,
no files.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

__all__ = [
    "COLUMNS",
    "PER_ROW_COLUMNS",
    "SERIES_COLUMNS",
    "SERIES_PER_ROW_COLUMNS",
    "METRIC_GROUPS",
    "SPECTRUM_COLUMNS",
    "RANK90_LOWER",
    "RANK90_UPPER",
    "INTRUDER_COLUMNS",
    "SUBSPACE_COLUMN",
    "FINAL_COLUMN",
    "STACK_ORDER",
    "CORRELATION_COLUMNS",
    "INTERVAL_COLUMNS",
    "INTERVAL",
    "INTERVAL_NOTE",
    "ROW_COUPLING_COLUMNS",
    "ROW_SUMMARY_COLUMNS",
    "parse_metrics",
    "metric_columns",
    "sort_rows",
    "METHODS",
    "METHOD_LABELS",
    "method_label",
    "method_order",
    "NOT_METRICS",
    "default_metric",
    "points",
    "module_is",
    "module_mask",
    "select_modules",
]

# ------------------------------------------------------------------------------------ the columns

#: ``compare``: one row per analysed tensor.
COLUMNS = [
    "tensor",
    "stack",
    "layer",
    "module",
    "shape",
    "rows",
    "delta_magnitude",
    "delta_direction",
    "base_magnitude_mean",
    "tuned_magnitude_mean",
    "rows_excluded",
    "status",
    "layout",
    "layout_source",
]

#: ``compare(..., per_row=True)``: one row per output unit. ``delta_magnitude`` is ``|m - m0|`` and
#: ``delta_direction`` ``1 - cos`` of that row (NaN for a zero row, which has no direction).
PER_ROW_COLUMNS = [
    "tensor",
    "stack",
    "layer",
    "module",
    "row",
    "base_magnitude",
    "tuned_magnitude",
    "delta_magnitude",
    "delta_direction",
]

#: ``analyze_series``: one row per (run, step, tensor).
SERIES_COLUMNS = [
    "run",
    "method",
    "step",
    "stack",
    "layer",
    "module",
    "tensor",
    "delta_magnitude",
    "delta_direction",
    "eval_metric",
    "eval_metric_name",
    "eval_loss",
    "base_magnitude_mean",
    "tuned_magnitude_mean",
    "shape",
    "rows",
    "rows_excluded",
    "status",
    "layout",
    "layout_source",
    "checkpoint",
]

#: ``analyze_series(..., per_row=True)``: one row per (run, step, tensor, output unit).
SERIES_PER_ROW_COLUMNS = ["run", "method", "step", *PER_ROW_COLUMNS, "checkpoint"]

#: The metric groups ``compare``/``series`` take (``metrics=``); ``decomposition`` is ΔM/ΔD.
METRIC_GROUPS = ("decomposition", "spectrum", "intruders")
#: Rigorous bounds on rank90 (equal to it where the spectrum is exact). On the randomised path
#: ``update_rank90`` is reported only where they meet (NaN otherwise) and ``update_effective_rank`` not at
#: all; views label them "rank90 (lower bound)" / "rank90 (upper bound)".
RANK90_LOWER = "update_rank90_lower"
RANK90_UPPER = "update_rank90_upper"
#: What the ``spectrum`` group adds (see :mod:`dora_analysis.analysis.spectrum`).
SPECTRUM_COLUMNS = [
    "update_rel_norm",
    "update_stable_rank",
    "update_effective_rank",
    "update_rank90",
    "update_top_singular",
    RANK90_LOWER,
    RANK90_UPPER,
]
#: What the ``intruders`` group adds: the count, and the k (top singular vectors examined, at most the
#: matrix's smaller side) and ε (the |cos| below which a vector is an intruder) it was counted with.
INTRUDER_COLUMNS = ["intruder_dimensions", "intruder_k", "intruder_eps"]
#: φ to a reference update (``--relative`` in compare).
SUBSPACE_COLUMN = "subspace_to_reference"
#: φ of each checkpoint's update with its run's final one (a series with ``spectrum``).
FINAL_COLUMN = "subspace_to_final"

#: ``correlations``: one row per run (or pooled runs), stack and module; every statistic with its
#: interval (``*_low``/``*_high``), what the intervals are (``interval``) and why one is missing.
SPEARMAN_LOW, SPEARMAN_HIGH = "spearman_low", "spearman_high"
SLOPE_LOW, SLOPE_HIGH = "slope_low", "slope_high"
R_WITHIN_STEP_LOW, R_WITHIN_STEP_HIGH = "r_within_step_low", "r_within_step_high"
R_WITHIN_LAYER_LOW, R_WITHIN_LAYER_HIGH = "r_within_layer_low", "r_within_layer_high"
#: What the row's intervals are, in words: ``"95% layer jackknife, t(5)"``.
INTERVAL = "interval"
#: Why an interval of the row is missing (NaN); None when every interval is there.
INTERVAL_NOTE = "interval_note"
#: ``statistic -> (low column, high column)`` for every interval of a row.
INTERVAL_COLUMNS = {
    "r": ("r_low", "r_high"),
    "spearman": (SPEARMAN_LOW, SPEARMAN_HIGH),
    "slope": (SLOPE_LOW, SLOPE_HIGH),
    "r_within_step": (R_WITHIN_STEP_LOW, R_WITHIN_STEP_HIGH),
    "r_within_layer": (R_WITHIN_LAYER_LOW, R_WITHIN_LAYER_HIGH),
}

CORRELATION_COLUMNS = [
    "method",
    "run",
    "stack",
    "module",
    "n",
    "runs",
    "steps",
    "layers",
    "r",
    "r_low",
    "r_high",
    "bootstrap",
    INTERVAL,
    INTERVAL_NOTE,
    "spearman",
    SPEARMAN_LOW,
    SPEARMAN_HIGH,
    "slope",
    SLOPE_LOW,
    SLOPE_HIGH,
    "intercept",
    "r_within_step",
    R_WITHIN_STEP_LOW,
    R_WITHIN_STEP_HIGH,
    "r_within_layer",
    R_WITHIN_LAYER_LOW,
    R_WITHIN_LAYER_HIGH,
]

#: :func:`~dora_analysis.analysis.coupling.row_coupling`: one row per (run, step, tensor).
ROW_COUPLING_COLUMNS = [
    "run",
    "method",
    "step",
    "stack",
    "layer",
    "module",
    "tensor",
    "rows",
    "r_abs",  # Pearson r over the rows of |Δm_n| with 1 - cos_n
    "r_signed",  # Pearson r over the rows of the signed Δm_n = m_n - m0_n with 1 - cos_n
    "spearman_abs",
    "spearman_signed",
]
#: :func:`~dora_analysis.analysis.coupling.row_coupling_summary`: one row per (method, stack, module, step).
ROW_SUMMARY_COLUMNS = [
    "method",
    "stack",
    "module",
    "step",
    "matrices",
    "layers",
    "r_abs",
    "r_abs_low",
    "r_abs_high",
    "r_signed",
    "r_signed_low",
    "r_signed_high",
    "interval",
    "interval_note",
]

#: Stacks in reading order: the input side of a model before its output side; others alphabetically after.
STACK_ORDER = ("model", "vision", "audio", "text", "encoder", "decoder")


def parse_metrics(metrics: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"decomposition,spectrum"`` (or a list) as the metric groups, in :data:`METRIC_GROUPS` order.

    ``decomposition`` (ΔM/ΔD, the default) is always included: its columns carry each tensor's
    rows and status, and it costs one pass over the weights.

    Raises:
        InputError: an unknown group.
    """
    if metrics is None:
        return ("decomposition",)
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in METRIC_GROUPS]
    if unknown:
        from dora_analysis.errors import InputError

        raise InputError.of(
            "--metrics", f"unknown metric group {unknown[0]!r}; expected {', '.join(METRIC_GROUPS)}"
        )
    return tuple(g for g in METRIC_GROUPS if g in names or g == "decomposition")


def metric_columns(metrics: Iterable[str], reference: bool = False) -> list[str]:
    """The columns the groups ``metrics`` add after :data:`COLUMNS` (and φ's where ``reference``)."""
    metrics = tuple(metrics)
    columns = (SPECTRUM_COLUMNS if "spectrum" in metrics else []) + (
        INTRUDER_COLUMNS if "intruders" in metrics else []
    )
    return columns + ([SUBSPACE_COLUMN] if reference else [])


# ---------------------------------------------------------------------------------- the row order


def sort_rows(frame: pd.DataFrame, first: Iterable[str] = ()) -> pd.DataFrame:
    """``frame`` ordered by ``first`` columns (kept in their order of appearance), then stack (input
    side first), layer as a number (rows outside the blocks after them), module and tensor; ``layer``
    becomes a nullable integer (``Int64``: "no layer" is ``<NA>``)."""
    frame = frame.copy()
    frame["layer"] = frame["layer"].astype("Int64")
    if frame.empty:
        return frame
    keys = pd.DataFrame(index=frame.index)
    for column in first:
        keys[column] = pd.factorize(frame[column], use_na_sentinel=False)[0]
    keys["_stack"] = frame["stack"].map(_stack_rank)
    keys["_stack_name"] = frame["stack"]
    keys["_no_layer"] = frame["layer"].isna()
    keys["_layer"] = frame["layer"].fillna(-1).astype("int64")
    keys["_module"] = frame["module"]
    keys["_tensor"] = frame["tensor"]
    order = keys.sort_values(list(keys.columns), kind="stable").index
    return frame.loc[order].reset_index(drop=True)


def _stack_rank(stack: str) -> tuple[int, ...]:
    words = str(stack).split(".")
    return tuple(STACK_ORDER.index(w) if w in STACK_ORDER else len(STACK_ORDER) for w in words)


# -------------------------------------------------------------------------------- methods, metrics

#: The methods, in the order the paper's figures show them.
METHODS: tuple[str, ...] = ("ft", "lora", "dora")
METHOD_LABELS = {"ft": "FT", "lora": "LoRA", "dora": "DoRA"}

#: Trainer ``log_history`` keys that are bookkeeping, never a quality metric to plot or report.
NOT_METRICS = ("eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch")


def method_label(method: str) -> str:
    """``"dora"`` -> ``"DoRA"``; an unknown method is shown as given."""
    return METHOD_LABELS.get(str(method).lower(), str(method))


def method_order(present: Iterable[str]) -> list[str]:
    """The methods in ``present`` in paper order, then any others sorted."""
    present = set(present)
    return [m for m in METHODS if m in present] + sorted(m for m in present if m not in METHODS)


def default_metric(columns: Iterable[str]) -> str | None:
    """The quality metric to show from a run's logged ``eval_*`` keys: accuracy if logged, else the first."""
    metrics = [c for c in columns if str(c).startswith("eval_") and c not in NOT_METRICS]
    if "eval_accuracy" in metrics:
        return "eval_accuracy"
    return metrics[0] if metrics else None


def points(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that are points of the analysis: finite ΔM and ΔD, not both exactly zero.

    Exact zeros are tensors the run never changed (a module LoRA does not adapt, or step 0), which
    would otherwise pile up at the origin and drive the correlation.
    """
    finite = np.isfinite(df["delta_direction"]) & np.isfinite(df["delta_magnitude"])
    moved = (df["delta_direction"] != 0) | (df["delta_magnitude"] != 0)
    return df[finite & moved]


def module_is(module: str, wanted: str) -> bool:
    """``module`` (a path inside a block, ``attention.self.query``) is ``wanted``, given whole or by its
    last parts (``query``, ``self.query``): the paper's names select our full module paths."""
    return module == wanted or str(module).endswith("." + wanted)


def module_mask(modules: pd.Series, wanted: str) -> pd.Series:
    """The entries of ``modules`` that are ``wanted`` (a boolean Series): the exact module where
    present, else the one module whose path ends with it.

    Raises:
        InputError: ``wanted`` ends several different modules (``q_proj``: ``self_attn.q_proj`` and
            ``encoder_attn.q_proj``), which must never be pooled.
    """
    exact = modules == wanted
    if exact.any():
        return exact
    mask = modules.map(lambda m: module_is(m, wanted)).astype(bool)
    found = sorted(set(modules[mask]))
    if len(found) > 1:
        from dora_analysis.errors import InputError

        raise InputError.of(
            "--modules", f"{wanted!r} names several modules ({', '.join(found)}): give the full name"
        )
    return mask


def select_modules(df: pd.DataFrame, modules: Iterable[str]) -> pd.DataFrame:
    """The rows of ``df`` that are each of ``modules`` (see :func:`module_mask`), their ``module``
    relabelled as asked (``query`` for ``attention.self.query``), in the order of ``modules``."""
    parts = [df[module_mask(df["module"], m)].assign(module=m) for m in modules]
    return pd.concat(parts) if parts else df.iloc[:0]

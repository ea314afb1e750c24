"""How ΔM and ΔD move together apart from the growth they share, and row by row.

The paper's pooled r of ΔM on ΔD mixes two things: how the two are coupled, and that both grow with
training (every matrix moves further at every step, so any two measures of change correlate). Three
views take the shared growth out:

- :func:`increments`: the change of ΔM and ΔD from one checkpoint to the next of the same run and
  tensor. Their correlation is about how the two move *together at a step*, not about both being
  larger later.
- :func:`relative_to_base`: ΔM over the layer's mean base magnitude, so layers with larger weights
  do not look as if they moved more.
- :func:`row_coupling`: the paper's mechanism (its gradient argument, Eq. 6-7) is about the output
  units (rows) of one matrix: within each matrix and step, the correlation over its rows ``n`` of
  ``|Δm_n|`` (and the signed ``Δm_n``) with ``1 - cos_n``; :func:`row_coupling_summary` pools those
  per-matrix r over a method's runs and layers, with the delete-one-layer jackknife interval of
  :mod:`dora_analysis.analysis.inference` (a layer index is dropped from every run at once).

Pure pandas/NumPy: frames in, frames out. The frames :func:`increments` and :func:`relative_to_base`
return have the series' columns, so :func:`~dora_analysis.analysis.correlation.correlations` takes
them unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dora_analysis.analysis.correlation import pearson, spearman
from dora_analysis.analysis.inference import MIN_LAYERS, jackknife_t_interval
from dora_analysis.schema import ROW_COUPLING_COLUMNS, ROW_SUMMARY_COLUMNS

__all__ = [
    "increments",
    "relative_to_base",
    "row_coupling",
    "row_coupling_summary",
]


def increments(series: pd.DataFrame) -> pd.DataFrame:
    """ΔM and ΔD minus their values at the run's previous checkpoint of the same tensor.

    Args:
        series: :func:`~dora_analysis.analyze_series`' frame (``run``, ``step``, ``tensor``, ...).
    Returns:
        The same columns, one row per tensor and checkpoint that has a previous one (the first
        checkpoint of a run has none: its change from the base is the growth this view leaves out),
        ``delta_magnitude``/``delta_direction`` holding the increments and ``step_from`` the
        previous step.
    """
    frame = series.sort_values(["run", "tensor", "step"], kind="stable")
    grouped = frame.groupby(["run", "tensor"], sort=False, dropna=False)
    previous = grouped[["step", "delta_magnitude", "delta_direction"]].shift(1)
    out = frame.assign(
        delta_magnitude=frame["delta_magnitude"] - previous["delta_magnitude"],
        delta_direction=frame["delta_direction"] - previous["delta_direction"],
        step_from=previous["step"].astype("Int64"),
    )
    out = out[previous["step"].notna()]
    return out.sort_index(kind="stable").reset_index(drop=True)


def relative_to_base(series: pd.DataFrame) -> pd.DataFrame:
    """The series with ``delta_magnitude`` divided by the tensor's mean base magnitude (``base_magnitude_mean``):
    a magnitude change relative to the layer's own scale. Rows with a zero base magnitude become NaN."""
    base = series["base_magnitude_mean"].astype(float)
    relative = series["delta_magnitude"].astype(float) / base.where(base > 0)
    return series.assign(delta_magnitude=relative)


def row_coupling(per_row: pd.DataFrame) -> pd.DataFrame:
    """Within each matrix and checkpoint, the correlation over its rows of the magnitude change with the
    direction change.

    Args:
        per_row: ``analyze_series(..., per_row=True)``'s frame (one row per output unit).
    Returns:
        Columns :data:`ROW_COUPLING_COLUMNS`; rows without a direction (a zero row: NaN ``1 - cos``)
        are left out of that matrix's correlations. Every r is exact for its matrix (its rows are all
        of them, not a sample): no interval here; see :func:`row_coupling_summary`.
    """
    records = []
    for (run, step, tensor), part in per_row.groupby(["run", "step", "tensor"], sort=False, dropna=False):
        valid = part[np.isfinite(part["delta_direction"].astype(float))]
        direction = valid["delta_direction"].to_numpy(np.float64)
        absolute = valid["delta_magnitude"].to_numpy(np.float64)
        signed = (valid["tuned_magnitude"] - valid["base_magnitude"]).to_numpy(np.float64)
        first = part.iloc[0]
        records.append(
            {
                "run": run,
                "method": first["method"],
                "step": step,
                "stack": first["stack"],
                "layer": first["layer"],
                "module": first["module"],
                "tensor": tensor,
                "rows": len(valid),
                "r_abs": pearson(absolute, direction),
                "r_signed": pearson(signed, direction),
                "spearman_abs": spearman(absolute, direction),
                "spearman_signed": spearman(signed, direction),
            }
        )
    frame = pd.DataFrame(records, columns=ROW_COUPLING_COLUMNS)
    frame["layer"] = frame["layer"].astype("Int64")
    frame["step"] = frame["step"].astype("Int64")
    return frame


def row_coupling_summary(coupling: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """The per-matrix row correlations of :func:`row_coupling` pooled per method, stack, module and step.

    The centre is the mean over the method's runs and layers on Fisher's z scale, mapped back; the
    interval is the delete-one-layer jackknife t interval (a layer index left out of every run at
    once, ``L - 1`` degrees of freedom), as for :func:`~dora_analysis.correlations`: the runs (seeds)
    share their layers, so the layers are the independent units. Below
    :data:`~dora_analysis.analysis.inference.MIN_LAYERS` layers, or where some |r| = 1, there is no
    interval and ``interval_note`` says why.
    """
    rows = []
    keys = ["method", "stack", "module", "step"]
    for key, part in coupling.groupby(keys, sort=False, dropna=False):
        part = part[part["layer"].notna()]
        record = dict(zip(keys, key, strict=True))
        record.update(matrices=len(part), layers=int(part["layer"].nunique()))
        notes = []
        for name in ("r_abs", "r_signed"):
            centre, low, high, note = _pooled(part, name, level)
            record.update({name: centre, f"{name}_low": low, f"{name}_high": high})
            if note:
                notes.append(f"{name}: {note}")
        record["interval"] = f"{level:.0%} layer jackknife, t({record['layers'] - 1})"
        record["interval_note"] = "; ".join(notes) or None
        rows.append(record)
    return pd.DataFrame(rows, columns=ROW_SUMMARY_COLUMNS)


def _pooled(part: pd.DataFrame, column: str, level: float) -> tuple[float, float, float, str | None]:
    """``(centre, low, high, note)``: the Fisher-z mean of ``column`` over the matrices, and its
    delete-one-layer jackknife t interval."""
    values = part[column].to_numpy(np.float64)
    layers = part["layer"].to_numpy()
    finite = np.isfinite(values) & (np.abs(values) < 1)
    if not finite.all():
        return math.nan, math.nan, math.nan, "some matrix has no r, or |r| = 1"
    z = np.arctanh(values)
    centre = float(np.tanh(z.mean())) if z.size else math.nan
    distinct = list(dict.fromkeys(layers.tolist()))
    if len(distinct) < MIN_LAYERS:
        return centre, math.nan, math.nan, f"{len(distinct)} layers: no interval below {MIN_LAYERS}"
    replicates = np.array([np.tanh(z[layers != layer].mean()) for layer in distinct])
    low, high = jackknife_t_interval(centre, replicates, level, fisher=True)
    return centre, low, high, None

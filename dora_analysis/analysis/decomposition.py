"""The paper's weight decomposition and the per-tensor changes it measures (Eq. 2-4). Pure tensor math.

Convention: a weight arrives as *rows*, shape ``(k, features)``, one row per output unit. For an
``nn.Linear`` weight ``(out_features, in_features)`` that is the weight itself: the paper writes W as
``d x k`` (the transpose of PyTorch's layout) and takes the norm "across each column", i.e. one norm
per output unit over its incoming weights, which is PyTorch's ``dim=1`` (what PEFT's ``get_weight_norm``
computes). :func:`dora_analysis.readers.names.as_rows` turns conv, embedding and ``Conv1D`` weights into
this layout.

Exactness: every per-row reduction is accumulated in float64 over float32 (or wider) inputs, and the
direction change is computed from the base row ``a`` and the update ``d = w - a`` (exact in float32 for
bf16/fp16 inputs) by Lagrange's identity, ``|a x w|^2 = |a|^2 |d|^2 - (a . d)^2``, so that
``1 - cos`` stays accurate when it is far below float32's epsilon (tiny full fine-tuning updates).
On CPU the three reductions run as one fused pass over blocks of rows on all cores
(:mod:`dora_analysis.analysis.fused_rows`); products of float32 values are exact in float64, so this changes
only the summation order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from dora_analysis.analysis.row_blocks import row_blocks

__all__ = [
    "magnitude",
    "direction",
    "RowScalars",
    "RowChanges",
    "TensorDelta",
    "row_scalars",
    "row_scalars_many",
    "row_changes",
    "stack_changes",
    "summarize",
    "summarize_many",
    "DeltaColumns",
    "summary_columns",
    "summarize_scalars",
    "deltas_of",
    "tensor_delta",
]


def magnitude(rows: torch.Tensor) -> torch.Tensor:
    """The paper's ``||W||_c``: one L2 norm per output unit.

    Args:
        rows: ``(k, features)``, one row per output unit (PyTorch ``nn.Linear`` layout).
    Returns:
        ``(k,)`` float32 norms (accumulated in float64).
    """
    return _sum_of_squares(rows).sqrt().float()


def direction(rows: torch.Tensor) -> torch.Tensor:
    """The paper's ``V / ||V||_c``: each row scaled to unit length (a zero row stays zero).

    Args:
        rows: ``(k, features)``.
    Returns:
        ``(k, features)`` float32.
    """
    norms = magnitude(rows)
    return rows.float() / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]


@dataclass(frozen=True)
class RowScalars:
    """The three float64 reductions per row that every change is computed from; all ``(k,)``.

    ``base_sq = |a|^2``, ``dot = a . d`` and ``update_sq = |d|^2`` for base row ``a`` and update
    ``d = w - a``. Dense pairs and factored low-rank updates both reduce to these. A series of tuned
    weights against one base gives fields ``(T, k)`` (see :func:`row_scalars_many`).
    """

    base_sq: torch.Tensor
    dot: torch.Tensor
    update_sq: torch.Tensor


@dataclass(frozen=True)
class RowChanges:
    """Per-row magnitudes and changes, all ``(k,)`` float64 (or ``(T, k)`` for a series).

    ``magnitude_change`` is ``|m - m0|`` and ``direction_change`` is ``1 - cos(w, a)``; both are NaN
    for an excluded row (``valid`` False: a zero row in the base or the tuned weight has no
    direction).
    """

    base_magnitude: torch.Tensor
    tuned_magnitude: torch.Tensor
    magnitude_change: torch.Tensor
    direction_change: torch.Tensor
    valid: torch.Tensor


class TensorDelta(NamedTuple):
    """One tensor's summary: the paper's ΔM (Eq. 3) and ΔD (Eq. 4) over its valid rows (a tuple:
    thousands are made per comparison, each in a fraction of a frozen dataclass's time).

    ``status`` is ``"ok"``, ``"nonfinite base"`` / ``"nonfinite tuned"`` (NaN or Inf in that weight;
    the means are NaN, never averaged in) or ``"no valid rows"``.
    """

    rows: int
    rows_excluded: int
    delta_magnitude: float
    delta_direction: float
    base_magnitude_mean: float
    tuned_magnitude_mean: float
    status: str


def _float(rows: torch.Tensor) -> torch.Tensor:
    return rows if rows.dtype == torch.float64 else rows.float()


def _sum_of_squares(rows: torch.Tensor) -> torch.Tensor:
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)
    for start, stop in row_blocks(rows):
        block = _float(rows[start:stop]).double()
        out[start:stop] = torch.linalg.vecdot(block, block)
    return out


def row_scalars(base: torch.Tensor, tuned: torch.Tensor) -> RowScalars:
    """Per-row ``|a|^2``, ``a . d`` and ``|d|^2`` of base rows ``a`` and updates ``d = tuned - base``.

    Args:
        base: ``(k, features)``, any float dtype (bf16, fp16, fp32, fp64).
        tuned: ``(k, features)``, same shape.
    Returns:
        :class:`RowScalars`, each ``(k,)`` float64 (on the inputs' device).
    """
    many = row_scalars_many(base, [tuned])
    return RowScalars(many.base_sq[0], many.dot[0], many.update_sq[0])


def row_scalars_many(base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> RowScalars:
    """:func:`row_scalars` of ``base`` against each of ``tuned``, streaming ``base`` once.

    Rows go in cache-sized blocks, each block of ``base`` compared with the same block of every
    tuned tensor while it is in cache. On CPU, bf16/fp16/fp32 rows take one fused pass (see
    :mod:`dora_analysis.analysis.fused_rows`): the update ``d = w - a`` formed in float32 as below, the three
    sums accumulated in float64, with the same results as the float64 path up to summation order.

    Args:
        base: ``(k, features)``.
        tuned: ``T`` tensors, each ``(k, features)``, on ``base``'s device.
    Returns:
        :class:`RowScalars` with fields ``(T, k)`` float64: row ``i`` is ``tuned[i]``'s.
    """
    for t in tuned:
        if base.shape != t.shape:
            raise ValueError(f"shape mismatch: base {tuple(base.shape)} != tuned {tuple(t.shape)}")
    if not tuned:
        empty = torch.empty(0, base.shape[0], dtype=torch.float64, device=base.device)
        return RowScalars(empty, empty, empty)
    if base.device.type == "cpu":
        from dora_analysis.analysis import fused_rows

        if fused_rows.supports(base, tuned):
            out = fused_rows.row_sums(base, tuned)  # (T, 3, k)
            return RowScalars(out[:, 0], out[:, 1], out[:, 2])
    each = [_row_scalars_float64(base, t) for t in tuned]
    return RowScalars(*(torch.stack([getattr(e, f) for e in each]) for f in ("base_sq", "dot", "update_sq")))


def _row_scalars_float64(base: torch.Tensor, tuned: torch.Tensor) -> RowScalars:
    """The reference path: every reduction in float64."""
    k = base.shape[0]
    base_sq, dot, update_sq = (torch.empty(k, dtype=torch.float64, device=base.device) for _ in range(3))
    for start, stop in row_blocks(base):
        a = _float(base[start:stop])
        d = _float(tuned[start:stop]) - a  # exact for bf16/fp16 inputs, and for close fp32 values
        a, d = a.double(), d.double()
        base_sq[start:stop] = torch.linalg.vecdot(a, a)
        dot[start:stop] = torch.linalg.vecdot(a, d)
        update_sq[start:stop] = torch.linalg.vecdot(d, d)
    return RowScalars(base_sq, dot, update_sq)


def row_changes(scalars: RowScalars) -> RowChanges:
    """Per-row magnitudes, ``|m - m0|`` and ``1 - cos`` from the three reductions, stably.

    Elementwise: fields ``(k,)`` give ``(k,)``, a series' ``(T, k)`` gives ``(T, k)``.

    ``m - m0 = (2 a.d + |d|^2) / (|a| + |w|)`` avoids subtracting two close norms, and for
    ``cos > 0``, ``1 - cos = |a x w|^2 / (|a|^2 |w|^2 (1 + cos))`` with Lagrange's
    ``|a x w|^2 = |a|^2 |d|^2 - (a.d)^2`` avoids subtracting ``cos`` from 1.
    """
    base_sq, dot, update_sq = scalars.base_sq, scalars.dot, scalars.update_sq
    tuned_sq = (base_sq + 2 * dot + update_sq).clamp_min(0)
    base_norm, tuned_norm = base_sq.sqrt(), tuned_sq.sqrt()
    valid = (base_sq > 0) & (tuned_sq > 0)
    safe = torch.where(valid, base_norm * tuned_norm, torch.ones_like(base_norm))
    cos = ((base_sq + dot) / safe).clamp(-1, 1)
    cross_sq = (base_sq * update_sq - dot * dot).clamp_min(0)
    one_minus_cos = torch.where(cos > 0, cross_sq / (safe * safe * (1 + cos)), 1 - cos)
    denominator = torch.where(valid, base_norm + tuned_norm, torch.ones_like(base_norm))
    magnitude_change = ((2 * dot + update_sq) / denominator).abs()
    nan = torch.full_like(base_norm, math.nan)
    return RowChanges(
        base_magnitude=base_norm,
        tuned_magnitude=tuned_norm,
        magnitude_change=torch.where(valid, magnitude_change, nan),
        direction_change=torch.where(valid, one_minus_cos, nan),
        valid=valid,
    )


def stack_changes(changes: Sequence[RowChanges]) -> RowChanges:
    """``T`` :class:`RowChanges` of ``(k,)`` fields as one with ``(T, k)`` fields."""
    fields = ("base_magnitude", "tuned_magnitude", "magnitude_change", "direction_change", "valid")
    return RowChanges(*(torch.stack([getattr(c, f) for c in changes]) for f in fields))


def summarize(changes: RowChanges) -> TensorDelta:
    """Means over the valid rows: ΔM = mean ``|m - m0|`` (Eq. 3), ΔD = mean ``1 - cos`` (Eq. 4).

    Args:
        changes: :class:`RowChanges` with ``(k,)`` fields.
    """
    return summarize_many(stack_changes([changes]))[0]


def summarize_many(changes: RowChanges) -> list[TensorDelta]:
    """:func:`summarize` of each row of a series' ``(T, k)`` changes (see :func:`summary_columns`)."""
    return deltas_of(summary_columns(changes))


def deltas_of(columns: DeltaColumns) -> list[TensorDelta]:
    """One :class:`TensorDelta` per entry of ``columns``."""
    return [TensorDelta(*values) for values in zip(*(c.tolist() for c in columns), strict=True)]


class DeltaColumns(NamedTuple):
    """:class:`TensorDelta`'s fields for ``T`` tensors, each a ``(T,)`` NumPy array (``rows`` and
    ``rows_excluded`` int64, ``status`` of str objects, the rest float64)."""

    rows: np.ndarray
    rows_excluded: np.ndarray
    delta_magnitude: np.ndarray
    delta_direction: np.ndarray
    base_magnitude_mean: np.ndarray
    tuned_magnitude_mean: np.ndarray
    status: np.ndarray


def summary_columns(changes: RowChanges) -> DeltaColumns:
    """:func:`summarize` of each row of ``(T, k)`` changes, as columns, in a few batched ops: no
    Python work per tensor, so that thousands of small tensors cost what one large one does.

    Rows with a NaN/Inf magnitude make the whole tensor ``"nonfinite base"``/``"nonfinite tuned"``
    (every mean NaN, never averaged in); a tensor without a valid row is ``"no valid rows"`` (ΔM, ΔD
    NaN; the magnitude means kept).
    """
    valid = changes.valid
    n_valid = valid.sum(-1)
    zero = torch.zeros((), dtype=changes.magnitude_change.dtype, device=valid.device)
    # Plain sums over the masked rows, then one division: the mean of the valid rows.
    columns = [
        torch.isfinite(changes.base_magnitude).all(-1),
        torch.isfinite(changes.tuned_magnitude).all(-1),
        n_valid,
        torch.where(valid, changes.magnitude_change, zero).sum(-1) / n_valid,
        torch.where(valid, changes.direction_change, zero).sum(-1) / n_valid,
        changes.base_magnitude.mean(-1),
        changes.tuned_magnitude.mean(-1),
    ]
    # One transfer for the whole series: (7, T) float64 (flags and counts are exact in float64).
    values = torch.stack([c.to(torch.float64) for c in columns]).cpu().numpy()
    return _delta_columns(values, int(valid.shape[-1]))


def summarize_scalars(scalars: RowScalars) -> DeltaColumns:
    """``summary_columns(row_changes(scalars))`` for scalars with fields ``(N, k)``: ``N`` tensors
    of ``k`` rows each. On the CPU one compiled pass (:mod:`~dora_analysis.analysis.fused_summary`:
    every row's values the same bits as :func:`row_changes`', the sums over rows in its own order,
    the same for a tensor alone or in a batch); elsewhere, or without Numba, those two functions."""
    from dora_analysis.analysis import fused_summary

    if scalars.base_sq.device.type != "cpu" or not fused_summary.available():
        return summary_columns(row_changes(scalars))
    arrays = [
        np.ascontiguousarray(getattr(scalars, f).to(torch.float64).numpy())
        for f in ("base_sq", "dot", "update_sq")
    ]
    return _delta_columns(fused_summary.tensor_sums(*arrays), int(scalars.base_sq.shape[-1]))


def _delta_columns(values: np.ndarray, rows: int) -> DeltaColumns:
    """:class:`DeltaColumns` from ``(7, T)`` values: base and tuned finite (1/0), valid rows, mean
    ``|m - m0|`` and ``1 - cos`` over them, mean base and tuned norms."""
    base_finite, tuned_finite, n_valid_, magnitude, direction, base_mean, tuned_mean = values
    finite = (base_finite != 0) & (tuned_finite != 0)
    ok = finite & (n_valid_ > 0)
    status = np.where(
        base_finite == 0,
        "nonfinite base",
        np.where(tuned_finite == 0, "nonfinite tuned", np.where(ok, "ok", "no valid rows")),
    ).astype(object)
    nan = np.float64(math.nan)
    return DeltaColumns(
        rows=np.full(len(ok), rows, dtype=np.int64),
        rows_excluded=np.where(ok, rows - n_valid_, rows).astype(np.int64),
        delta_magnitude=np.where(ok, magnitude, nan),
        delta_direction=np.where(ok, direction, nan),
        base_magnitude_mean=np.where(finite, base_mean, nan),
        tuned_magnitude_mean=np.where(finite, tuned_mean, nan),
        status=status,
    )


def tensor_delta(base: torch.Tensor, tuned: torch.Tensor) -> TensorDelta:
    """ΔM and ΔD of one weight pair in row layout ``(k, features)``; see :func:`summarize`.

    Example:
        >>> w0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
        >>> d = tensor_delta(w0, 2 * w0)   # scaling rows changes magnitude only
        >>> round(d.delta_magnitude, 6), round(d.delta_direction, 6)
        (3.0, 0.0)
    """
    return summarize(row_changes(row_scalars(base, tuned)))

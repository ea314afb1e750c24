"""The paper's weight decomposition and the per-tensor changes it measures (Eq. 2-4). Pure tensor math.

Convention: a weight arrives as *rows*, shape ``(k, features)``, one row per output unit. For an
``nn.Linear`` weight ``(out_features, in_features)`` that is the weight itself: the paper writes W as
``d x k`` (the transpose of PyTorch's layout) and takes the norm "across each column", i.e. one norm
per output unit over its incoming weights, which is PyTorch's ``dim=1`` (what PEFT's ``get_weight_norm``
computes). :func:`dora_analysis.tensor_names.as_rows` turns conv, embedding and ``Conv1D`` weights into
this layout.

Exactness: every per-row reduction is accumulated in float64 over float32 (or wider) inputs, and the
direction change is computed from the base row ``a`` and the update ``d = w - a`` (exact in float32 for
bf16/fp16 inputs) by Lagrange's identity, ``|a x w|^2 = |a|^2 |d|^2 - (a . d)^2``, so that
``1 - cos`` stays accurate when it is far below float32's epsilon (tiny full fine-tuning updates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "magnitude",
    "direction",
    "RowScalars",
    "RowChanges",
    "TensorDelta",
    "row_scalars",
    "row_changes",
    "summarize",
    "tensor_delta",
]

# Rows are processed in blocks of about this many elements, so float64 temporaries stay in cache and
# the extra memory is bounded whatever the tensor's size.
BLOCK_ELEMENTS = 1 << 18


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
    ``d = w - a``. Dense pairs and factored low-rank updates both reduce to these.
    """

    base_sq: torch.Tensor
    dot: torch.Tensor
    update_sq: torch.Tensor


@dataclass(frozen=True)
class RowChanges:
    """Per-row magnitudes and changes, all ``(k,)`` float64.

    ``magnitude_change`` is ``|m - m0|`` and ``direction_change`` is ``1 - cos(w, a)``; both are NaN
    for an excluded row (``valid`` False: a zero row in the base or the tuned weight has no
    direction).
    """

    base_magnitude: torch.Tensor
    tuned_magnitude: torch.Tensor
    magnitude_change: torch.Tensor
    direction_change: torch.Tensor
    valid: torch.Tensor


@dataclass(frozen=True)
class TensorDelta:
    """One tensor's summary: the paper's ΔM (Eq. 3) and ΔD (Eq. 4) over its valid rows.

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
    out = torch.empty(rows.shape[0], dtype=torch.float64)
    for start, stop in _blocks(rows):
        block = _float(rows[start:stop]).double()
        out[start:stop] = torch.linalg.vecdot(block, block)
    return out


def _blocks(rows: torch.Tensor):
    k, features = rows.shape
    step = max(1, BLOCK_ELEMENTS // max(features, 1))
    for start in range(0, k, step):
        yield start, min(start + step, k)


def row_scalars(base: torch.Tensor, tuned: torch.Tensor) -> RowScalars:
    """Per-row ``|a|^2``, ``a . d`` and ``|d|^2`` of base rows ``a`` and updates ``d = tuned - base``.

    Args:
        base: ``(k, features)``, any float dtype (bf16, fp16, fp32, fp64).
        tuned: ``(k, features)``, same shape.
    Returns:
        :class:`RowScalars`, each ``(k,)`` float64.
    """
    if base.shape != tuned.shape:
        raise ValueError(f"shape mismatch: base {tuple(base.shape)} != tuned {tuple(tuned.shape)}")
    k = base.shape[0]
    base_sq, dot, update_sq = (torch.empty(k, dtype=torch.float64) for _ in range(3))
    for start, stop in _blocks(base):
        a = _float(base[start:stop])
        d = _float(tuned[start:stop]) - a  # exact for bf16/fp16 inputs, and for close fp32 values
        a, d = a.double(), d.double()
        base_sq[start:stop] = torch.linalg.vecdot(a, a)
        dot[start:stop] = torch.linalg.vecdot(a, d)
        update_sq[start:stop] = torch.linalg.vecdot(d, d)
    return RowScalars(base_sq, dot, update_sq)


def row_changes(scalars: RowScalars) -> RowChanges:
    """Per-row magnitudes, ``|m - m0|`` and ``1 - cos`` from the three reductions, stably.

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


def summarize(changes: RowChanges) -> TensorDelta:
    """Means over the valid rows: ΔM = mean ``|m - m0|`` (Eq. 3), ΔD = mean ``1 - cos`` (Eq. 4)."""
    rows = int(changes.valid.numel())
    if not bool(torch.isfinite(changes.base_magnitude).all()):
        return _nonfinite(rows, "nonfinite base")
    if not bool(torch.isfinite(changes.tuned_magnitude).all()):
        return _nonfinite(rows, "nonfinite tuned")
    valid = changes.valid
    n_valid = int(valid.sum())
    if n_valid == 0:
        return TensorDelta(rows, rows, math.nan, math.nan, _mean(changes.base_magnitude),
                           _mean(changes.tuned_magnitude), "no valid rows")
    return TensorDelta(
        rows=rows,
        rows_excluded=rows - n_valid,
        delta_magnitude=float(changes.magnitude_change[valid].mean()),
        delta_direction=float(changes.direction_change[valid].mean()),
        base_magnitude_mean=_mean(changes.base_magnitude),
        tuned_magnitude_mean=_mean(changes.tuned_magnitude),
        status="ok",
    )


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def _nonfinite(rows: int, status: str) -> TensorDelta:
    return TensorDelta(rows, rows, math.nan, math.nan, math.nan, math.nan, status)


def tensor_delta(base: torch.Tensor, tuned: torch.Tensor) -> TensorDelta:
    """ΔM and ΔD of one weight pair in row layout ``(k, features)``; see :func:`summarize`.

    Example:
        >>> w0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
        >>> d = tensor_delta(w0, 2 * w0)   # scaling rows changes magnitude only
        >>> round(d.delta_magnitude, 6), round(d.delta_direction, 6)
        (3.0, 0.0)
    """
    return summarize(row_changes(row_scalars(base, tuned)))

"""The paper's weight decomposition and the per-tensor changes it measures (Eq. 2-4). Pure tensor math.

Convention: a weight arrives as *rows*, shape ``(k, features)``, one row per output unit. For an
``nn.Linear`` weight ``(out_features, in_features)`` that is the weight itself: the paper writes W as
``d x k`` (the transpose of PyTorch's layout) and takes the norm "across each column", i.e. one norm
per output unit over its incoming weights, which is PyTorch's ``dim=1`` (what PEFT's ``get_weight_norm``
computes). :func:`dora_analysis.tensor_names.as_rows` turns conv, embedding and ``Conv1D`` weights into
this layout.

Exactness: the direction change is computed from the base row ``a`` and the update ``d = w - a``
(exact in float32 for bf16/fp16 inputs) by Lagrange's identity, ``|a x w|^2 = |a|^2 |d|^2 - (a . d)^2``,
so that ``1 - cos`` stays accurate when it is far below float32's epsilon (tiny full fine-tuning
updates). Per-row reductions run as float32 dot products over cache-sized blocks, widened to float64
per row; rows where that could lose accuracy (an update nearly parallel to its row, non-finite or
subnormal-range sums) are recomputed exactly (see :func:`row_scalars_many`), and float64 inputs stay
float64 throughout. Results agree with a float64 reference to about 1e-6 relative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "magnitude",
    "direction",
    "RowScalars",
    "RowChanges",
    "TensorDelta",
    "row_scalars",
    "row_scalars_many",
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


# Storage dtypes the float32 fast path handles exactly enough (see the module docstring of the fast
# path in :func:`row_scalars_many`); float64 inputs keep the float64 path.
_FAST_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# A float32 sum of squares below this may have lost bits to subnormals: such rows (and zero rows)
# are recomputed in float64, as are rows whose float32 sums overflowed.
_TINY = 1e-30
# Rows whose update is this close to parallel to the base row (cos^2 above it) lose 1 - cos to
# cancellation in Lagrange's identity at float32 precision: they are re-projected (see _refine_rows).
_COS2_REFINE = 0.9
_MAX_REFINE = 6


def _sum_of_squares(rows: torch.Tensor) -> torch.Tensor:
    k = rows.shape[0]
    if rows.dtype not in _FAST_DTYPES:
        out = torch.empty(k, dtype=torch.float64, device=rows.device)
        for start, stop in _blocks(rows):
            block = _float(rows[start:stop]).double()
            out[start:stop] = torch.linalg.vecdot(block, block)
        return out
    sums = torch.empty(k, dtype=torch.float32, device=rows.device)
    buffer = _block_buffer(rows)
    for start, stop in _blocks(rows):
        a = _as_float32(rows[start:stop], buffer)
        torch.linalg.vecdot(a, a, out=sums[start:stop])
    out = sums.double()
    bad = ~torch.isfinite(out) | (out < _TINY)
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(1)
        block = rows[idx].double()
        out[idx] = torch.linalg.vecdot(block, block)
    return out


def _blocks(rows: torch.Tensor):
    k, features = rows.shape
    step = max(1, BLOCK_ELEMENTS // max(features, 1))
    for start in range(0, k, step):
        yield start, min(start + step, k)


def _block_buffer(rows: torch.Tensor) -> torch.Tensor | None:
    """A reusable float32 block, or None where the rows are float32 already (used in place)."""
    if rows.dtype == torch.float32:
        return None
    k, features = rows.shape
    step = max(1, BLOCK_ELEMENTS // max(features, 1))
    return torch.empty(min(step, k), features, dtype=torch.float32, device=rows.device)


def _as_float32(block: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    if buffer is None:
        return block
    out = buffer[: block.shape[0]]
    out.copy_(block)  # bf16/fp16 -> float32 is exact
    return out


def row_scalars(base: torch.Tensor, tuned: torch.Tensor) -> RowScalars:
    """Per-row ``|a|^2``, ``a . d`` and ``|d|^2`` of base rows ``a`` and updates ``d = tuned - base``.

    Args:
        base: ``(k, features)``, any float dtype (bf16, fp16, fp32, fp64).
        tuned: ``(k, features)``, same shape.
    Returns:
        :class:`RowScalars`, each ``(k,)`` float64 (on the inputs' device).
    """
    return row_scalars_many(base, [tuned])[0]


def row_scalars_many(base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> list[RowScalars]:
    """:func:`row_scalars` of ``base`` against each of ``tuned``, converting and reducing ``base`` once.

    Fast path (bf16/fp16/fp32 inputs): rows are streamed in cache-sized blocks; each block is
    converted to float32 once and the update ``d = w - a`` formed in float32 (exact for bf16/fp16,
    and for fp32 rows within a factor 2 of each other, as in the float64 path), and the three
    reductions are float32 dot products (``torch.linalg.vecdot``, cascade-summed), widened to
    float64 per row. Lagrange's ``|a|^2 |d|^2 - (a.d)^2`` loses 1 - cos to cancellation only when
    ``d`` is nearly parallel to ``a`` (a row mostly rescaled); such rows are re-projected exactly:
    ``r = d - c a`` with ``c`` rounded to 8 significant bits so that ``c a`` is exact in float32
    (fp32 rows split into a bf16 head and its remainder), which leaves ``|a x r| = |a x d|`` and is
    repeated until ``r`` is far from parallel; ``c`` is then folded back in float64
    (``a.d = c|a|^2 + a.r``, ``|d|^2 = c^2|a|^2 + 2c a.r + |r|^2``). Rows with non-finite, zero or
    subnormal-range sums, and float64 inputs, take the float64 path.

    Args:
        base: ``(k, features)``.
        tuned: each ``(k, features)``.
    Returns:
        One :class:`RowScalars` per tuned tensor, each field ``(k,)`` float64.
    """
    for t in tuned:
        if base.shape != t.shape:
            raise ValueError(f"shape mismatch: base {tuple(base.shape)} != tuned {tuple(t.shape)}")
    if not tuned:
        return []
    if base.dtype not in _FAST_DTYPES or any(t.dtype not in _FAST_DTYPES for t in tuned):
        return [_row_scalars_float64(base, t) for t in tuned]
    k = base.shape[0]
    device = base.device
    base_sq = torch.empty(k, dtype=torch.float32, device=device)
    dots = torch.empty(len(tuned), k, dtype=torch.float32, device=device)
    update_sqs = torch.empty(len(tuned), k, dtype=torch.float32, device=device)
    a_buffer = _block_buffer(base)
    step = max(1, BLOCK_ELEMENTS // max(base.shape[1], 1))
    d_buffer = torch.empty(min(step, k), base.shape[1], dtype=torch.float32, device=device)
    for start, stop in _blocks(base):
        a = _as_float32(base[start:stop], a_buffer)  # (b, features) float32
        d = d_buffer[: stop - start]
        torch.linalg.vecdot(a, a, out=base_sq[start:stop])
        for i, t in enumerate(tuned):
            torch.sub(_as_float32(t[start:stop], d), a, out=d)
            torch.linalg.vecdot(a, d, out=dots[i, start:stop])
            torch.linalg.vecdot(d, d, out=update_sqs[i, start:stop])
    return [
        _finish(base, t, base_sq.double(), dots[i].double(), update_sqs[i].double())
        for i, t in enumerate(tuned)
    ]


def _finish(
    base: torch.Tensor, tuned: torch.Tensor, base_sq: torch.Tensor, dot: torch.Tensor, update_sq: torch.Tensor
) -> RowScalars:
    """Fix up the rows the float32 sums cannot be trusted for; all vectors ``(k,)`` float64."""
    finite = torch.isfinite(base_sq) & torch.isfinite(dot) & torch.isfinite(update_sq)
    bad = ~finite | (base_sq < _TINY) | ((update_sq < _TINY) & (update_sq > 0))
    parallel = ~bad & (update_sq > 0) & (dot * dot > _COS2_REFINE * base_sq * update_sq)
    if bool(parallel.any()):
        idx = parallel.nonzero().squeeze(1)
        b, x, r, c = _refine_rows(base[idx], tuned[idx])
        base_sq[idx] = b
        dot[idx] = c * b + x
        update_sq[idx] = c * c * b + 2 * c * x + r
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(1)
        exact = _row_scalars_float64(base[idx], tuned[idx])
        base_sq[idx], dot[idx], update_sq[idx] = exact.base_sq, exact.dot, exact.update_sq
    return RowScalars(base_sq, dot, update_sq)


def _refine_rows(
    base: torch.Tensor, tuned: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``|a|^2``, ``a.r``, ``|r|^2`` and ``c`` (all ``(m,)`` float64) with ``r = d - c a`` far from parallel to ``a``.

    Args:
        base, tuned: ``(m, features)`` rows whose update is nearly parallel to the base row.
    """
    a = base.float()
    r = tuned.float() - a
    # c * part must be exact in float32 for an 8-bit c: bf16/fp16 rows already are short enough,
    # fp32 rows are split into a bf16 head and a remainder of at most 16 significant bits.
    if base.dtype == torch.float32:
        head = a.bfloat16().float()
        parts = (head, a - head)
    else:
        parts = (a,)
    base_sq = torch.linalg.vecdot(a, a).double()
    c_total = torch.zeros_like(base_sq)
    dot, update_sq = torch.linalg.vecdot(a, r).double(), torch.linalg.vecdot(r, r).double()
    for _ in range(_MAX_REFINE):
        need = (update_sq > 0) & (dot * dot > _COS2_REFINE * base_sq * update_sq)
        if not bool(need.any()):
            break
        c = torch.where(need, dot / base_sq, torch.zeros_like(dot)).to(torch.bfloat16).float()  # (m,)
        for part in parts:
            r.sub_(c[:, None] * part)
        c_total += c.double()
        dot, update_sq = torch.linalg.vecdot(a, r).double(), torch.linalg.vecdot(r, r).double()
    return base_sq, dot, update_sq, c_total


def _row_scalars_float64(base: torch.Tensor, tuned: torch.Tensor) -> RowScalars:
    """The reference path: every reduction in float64."""
    k = base.shape[0]
    base_sq, dot, update_sq = (torch.empty(k, dtype=torch.float64, device=base.device) for _ in range(3))
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
        return TensorDelta(
            rows,
            rows,
            math.nan,
            math.nan,
            _mean(changes.base_magnitude),
            _mean(changes.tuned_magnitude),
            "no valid rows",
        )
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

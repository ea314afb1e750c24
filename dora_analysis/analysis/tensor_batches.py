"""Tensors compared in batches: the per-tensor fixed cost paid once per batch.

A tensor's arithmetic is one pass over its bytes, but around it sit a dozen small-vector ops (kernel
dispatch, row changes, the means) of a fixed cost, a few hundred microseconds: thousands of tensors
(an MoE's experts, a header of tiny tensors) would spend more time there than reading. Tensors of one
row shape, dtypes and set of tuned checkpoints go through the same functions as one tensor of their
stacked rows ``(m * k, features)``: per row the arithmetic is exactly that of the tensor alone (rows
never mix), only the means are taken per ``(k,)`` segment afterwards. On the CPU the fused kernel
reads the rows where they lie (:func:`~dora_analysis.analysis.fused_rows.row_sums_stacked`); where
it cannot, small tensors are stacked (a copy of microseconds) and larger ones compared one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dora_analysis.analysis import fused_rows
from dora_analysis.analysis.decomposition import (
    RowChanges,
    RowScalars,
    TensorDelta,
    row_changes,
    row_scalars_many,
    summarize_many,
)

__all__ = [
    "SMALL_ELEMENTS",
    "BATCH_ELEMENTS",
    "BATCH_TENSORS",
    "Item",
    "deltas_of_many",
    "row_of",
    "stacked_scalars",
]

# Where the kernel cannot read the rows in place, a tensor of at most this many elements is stacked:
# the copy (microseconds) costs far less than the fixed cost it saves.
SMALL_ELEMENTS = 1 << 16
# One batch holds at most this many elements (base and tuned together; 256 MB as float32, for the
# readers that copy) and this many base tensors: bounded, never a whole checkpoint.
BATCH_ELEMENTS = 1 << 26
BATCH_TENSORS = 4096

# One base tensor's rows ``(k, features)`` and, per tuned checkpoint that has it, (tuned index, rows).
Item = tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]
_FIELDS = ("base_magnitude", "tuned_magnitude", "magnitude_change", "direction_change", "valid")


def deltas_of_many(
    items: Sequence[Item], per_row: bool = False
) -> list[tuple[dict[int, TensorDelta], dict[int, RowChanges]]]:
    """Per item, ΔM/ΔD against each of its tuned tensors (by tuned index), and with ``per_row``
    each one's :class:`RowChanges` (``(k,)`` fields, on the CPU); the same as comparing each item
    alone with :func:`row_scalars_many`, :func:`row_changes` and :func:`summarize_many`."""
    groups: dict[tuple, list[int]] = {}
    for position, (base, tuned) in enumerate(items):
        key = (base.shape, base.dtype, base.device, *((index, r.dtype, r.shape) for index, r in tuned))
        groups.setdefault(key, []).append(position)
    out: list[tuple[dict[int, TensorDelta], dict[int, RowChanges]]] = [({}, {}) for _ in items]
    for positions in groups.values():
        _one_group(items, positions, per_row, out)
    return out


def _one_group(
    items: Sequence[Item],
    positions: list[int],
    per_row: bool,
    out: list[tuple[dict[int, TensorDelta], dict[int, RowChanges]]],
) -> None:
    """Compare the ``m`` items at ``positions`` (one row shape ``(k, n)``, one set of tuned indices)
    as one ``(m * k, n)`` block; write their results into ``out``."""
    m = len(positions)
    base0, tuned0 = items[positions[0]]
    k, n = base0.shape
    bases = [items[p][0] for p in positions]
    tuned = [[items[p][1][j][1] for p in positions] for j in range(len(tuned0))]
    changes = row_changes(stacked_scalars(bases, tuned))  # fields (T, m * k)
    del bases, tuned
    # (T, m * k) -> (T * m, k): row t * m + q is tuned t against item q, one tensor's rows.
    each = RowChanges(*(getattr(changes, f).reshape(len(tuned0) * m, k) for f in _FIELDS))
    deltas = summarize_many(each)
    for t, (index, _) in enumerate(tuned0):
        for q, position in enumerate(positions):
            out[position][0][index] = deltas[t * m + q]
            if per_row:
                out[position][1][index] = row_of(each, t * m + q)


def stacked_scalars(bases: Sequence[torch.Tensor], tuned: Sequence[Sequence[torch.Tensor]]) -> RowScalars:
    """:func:`row_scalars_many` of ``m`` tensors of one shape as if stacked into ``(m * k, features)``.

    Args:
        bases: ``m`` tensors ``(k, features)``.
        tuned: ``T`` series of ``m`` tensors, ``tuned[t][q]`` compared with ``bases[q]``.
    Returns:
        :class:`RowScalars` with fields ``(T, m * k)``: row ``q * k + j`` is row ``j`` of tensor ``q``.
    """
    out = fused_rows.row_sums_stacked(bases, tuned)  # (T, 3, m * k), read where the rows lie
    if out is not None:
        return RowScalars(out[:, 0], out[:, 1], out[:, 2])
    m, (k, n) = len(bases), bases[0].shape
    if k * n <= SMALL_ELEMENTS:  # small: one copy, one pass
        return row_scalars_many(
            torch.stack(list(bases)).reshape(m * k, n),
            [torch.stack(list(s)).reshape(m * k, n) for s in tuned],
        )
    each = [row_scalars_many(base, [s[q] for s in tuned]) for q, base in enumerate(bases)]
    return RowScalars(
        *(torch.cat([getattr(e, f) for e in each], dim=1) for f in ("base_sq", "dot", "update_sq"))
    )


def row_of(changes: RowChanges, i: int) -> RowChanges:
    """Row ``i`` of ``(T, k)`` changes as ``(k,)`` CPU tensors (kept for per-row output)."""
    return RowChanges(*(getattr(changes, f)[i].cpu() for f in _FIELDS))

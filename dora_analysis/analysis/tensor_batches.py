"""Tensors compared in batches: the per-tensor fixed cost paid once per batch.

A tensor's arithmetic is one pass over its bytes, but around it sit a dozen small-vector ops (kernel
dispatch, row changes, the means) of a fixed cost, a few hundred microseconds: thousands of tensors
(an MoE's experts, a header of tiny tensors) would spend more time there than reading. Tensors of one
row shape, dtypes and set of tuned checkpoints go through the same functions as one tensor of their
stacked rows ``(m * k, features)``: per row the arithmetic is exactly that of the tensor alone (rows
never mix), and each tensor's summary is one pass over its own ``k`` rows
(:func:`~dora_analysis.analysis.decomposition.summarize_scalars`), so its numbers are the same bits
alone or in a batch. On the CPU the fused kernel reads the rows where they lie: found by address in a
memory map (:func:`located_summaries`, no tensor made per item) or given as tensors
(:func:`~dora_analysis.analysis.fused_rows.row_sums_stacked`); where it cannot, small tensors are
stacked (a copy of microseconds) and larger ones compared one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from dora_analysis.analysis import fused_rows
from dora_analysis.analysis.decomposition import (
    DeltaColumns,
    RowChanges,
    RowScalars,
    TensorDelta,
    deltas_of,
    row_changes,
    row_scalars_many,
    summarize_scalars,
)
from dora_analysis.readers.base import StoredTensor

__all__ = [
    "SMALL_ELEMENTS",
    "BATCH_ELEMENTS",
    "BATCH_TENSORS",
    "Item",
    "Located",
    "GroupSummary",
    "group_summaries",
    "located_summaries",
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
# The same, the rows found in memory (``shape`` the rows' ``(k, features)``).
Located = tuple[StoredTensor, list[tuple[int, StoredTensor]]]
_FIELDS = ("base_magnitude", "tuned_magnitude", "magnitude_change", "direction_change", "valid")


class GroupSummary(NamedTuple):
    """The items of one row shape and set of tuned checkpoints, compared as one block.

    ``positions``: the ``m`` items (indices into the batch); ``tuned``: the ``T`` tuned indices;
    ``summary``: ``(T * m,)`` columns, entry ``t * m + q`` is ``tuned[t]`` against item
    ``positions[q]``; ``changes``: with ``per_row``, :class:`RowChanges` ``(T * m, k)`` on the CPU
    in the same order, else None.
    """

    positions: list[int]
    tuned: list[int]
    summary: DeltaColumns
    changes: RowChanges | None


def group_summaries(items: Sequence[Item], per_row: bool = False) -> list[GroupSummary]:
    """ΔM/ΔD of every item against each of its tuned tensors, one group per row shape, dtypes and
    set of tuned checkpoints; the same as comparing each item alone with :func:`row_scalars_many`,
    :func:`row_changes` and :func:`summarize_many`, with no Python work per tensor after grouping."""
    return [_one_group(items, positions, per_row) for positions in _groups(items)]


def _groups(items: Sequence[Item] | Sequence[Located]) -> list[list[int]]:
    """Positions of the items sharing a row shape, stored formats (and device) and tuned indices."""
    groups: dict[tuple, list[int]] = {}
    for position, (base, tuned) in enumerate(items):
        key = (
            base.shape,
            base.dtype,
            getattr(base, "device", None),
            *[(i, r.dtype, r.shape) for i, r in tuned],
        )
        groups.setdefault(key, []).append(position)
    return list(groups.values())


def deltas_of_many(
    items: Sequence[Item], per_row: bool = False
) -> list[tuple[dict[int, TensorDelta], dict[int, RowChanges]]]:
    """:func:`group_summaries` per item: its :class:`TensorDelta` against each of its tuned tensors
    (by tuned index), and with ``per_row`` each one's :class:`RowChanges` (``(k,)`` fields)."""
    out: list[tuple[dict[int, TensorDelta], dict[int, RowChanges]]] = [({}, {}) for _ in items]
    for group in group_summaries(items, per_row):
        m = len(group.positions)
        deltas = deltas_of(group.summary)
        for t, index in enumerate(group.tuned):
            for q, position in enumerate(group.positions):
                out[position][0][index] = deltas[t * m + q]
                if per_row:
                    out[position][1][index] = row_of(group.changes, t * m + q)
    return out


def _one_group(items: Sequence[Item], positions: list[int], per_row: bool) -> GroupSummary:
    """Compare the ``m`` items at ``positions`` (one row shape ``(k, n)``, one set of tuned indices)
    as one ``(m * k, n)`` block."""
    base0, tuned0 = items[positions[0]]
    bases = [items[p][0] for p in positions]
    tuned = [[items[p][1][j][1] for p in positions] for j in range(len(tuned0))]
    scalars = stacked_scalars(bases, tuned)  # fields (T, m * k)
    del bases, tuned
    return _summarized(positions, [index for index, _ in tuned0], scalars, base0.shape[0], per_row)


def located_summaries(items: Sequence[Located], per_row: bool = False) -> list[GroupSummary]:
    """:func:`group_summaries` of rows found by address in memory (each :class:`StoredTensor` a
    row-major ``(k, features)`` array there, bf16/fp16/fp32 as
    :func:`~dora_analysis.analysis.fused_rows.reads_in_place` allows): the kernel reads them where
    they lie, with no tensor made per item. The caller keeps every record alive during the call."""
    out = []
    for positions in _groups(items):
        base0, tuned0 = items[positions[0]]
        if any(r.shape != base0.shape for _, r in tuned0):
            raise ValueError(
                f"located_summaries: tuned rows {[r.shape for _, r in tuned0]} != base {base0.shape}"
            )
        k, features = base0.shape
        series = [
            ([items[p][1][j][1].address for p in positions], stored.dtype)
            for j, (_, stored) in enumerate(tuned0)
        ]
        sums = fused_rows.row_sums_at(
            [items[p][0].address for p in positions], base0.dtype, series, k, features
        )
        scalars = RowScalars(sums[:, 0], sums[:, 1], sums[:, 2])
        out.append(_summarized(positions, [index for index, _ in tuned0], scalars, k, per_row))
    return out


def _summarized(
    positions: list[int], tuned: list[int], scalars: RowScalars, k: int, per_row: bool
) -> GroupSummary:
    """The group's summary from its row scalars (fields ``(T, m * k)``)."""
    # (T, m * k) -> (T * m, k): row t * m + q is tuned t against item q, one tensor's rows.
    n = len(tuned) * len(positions)
    each = RowScalars(*(getattr(scalars, f).reshape(n, k) for f in ("base_sq", "dot", "update_sq")))
    kept = None
    if per_row:
        changes = row_changes(each)
        kept = RowChanges(*(getattr(changes, f).cpu() for f in _FIELDS))
    return GroupSummary(positions, tuned, summarize_scalars(each), kept)


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

"""Many small tensors compared in a few passes: the per-tensor fixed cost amortised over a batch.

A tensor of a few thousand elements takes microseconds of arithmetic but a dozen small-vector ops
(kernel dispatch, row changes, the means) of fixed cost; thousands of them (MoE experts, a header of
tiny tensors) would spend all their time there. Tensors of the same row shape, dtypes and tuned
checkpoints are stacked into one ``(m * k, features)`` block and go through the same functions as
one tensor: per row the arithmetic is exactly that of the tensor alone (rows never mix), only the
means are taken per ``(k,)`` segment afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dora_analysis.analysis.decomposition import (
    RowChanges,
    TensorDelta,
    row_changes,
    row_scalars_many,
    summarize_many,
)

__all__ = ["SMALL_ELEMENTS", "BATCH_ELEMENTS", "BATCH_TENSORS", "Item", "deltas_of_many", "row_of", "stacked"]

# A tensor of at most this many elements is batched: stacking copies it once (microseconds), far
# below the fixed cost it saves; larger ones go through the per-tensor path.
SMALL_ELEMENTS = 1 << 16
# One batch holds at most this many elements (base and tuned together, each stacked copy of these
# counted once) and this many base tensors: a bounded few tens of MB, never a whole checkpoint.
BATCH_ELEMENTS = 1 << 24
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
    base = stacked([items[p][0] for p in positions]).reshape(m * k, n)
    tuned = [stacked([items[p][1][j][1] for p in positions]).reshape(m * k, n) for j in range(len(tuned0))]
    changes = row_changes(row_scalars_many(base, tuned))  # fields (T, m * k)
    del base, tuned
    # (T, m * k) -> (T * m, k): row t * m + q is tuned t against item q, one tensor's rows.
    each = RowChanges(*(getattr(changes, f).reshape(len(tuned0) * m, k) for f in _FIELDS))
    deltas = summarize_many(each)
    for t, (index, _) in enumerate(tuned0):
        for q, position in enumerate(positions):
            out[position][0][index] = deltas[t * m + q]
            if per_row:
                out[position][1][index] = row_of(each, t * m + q)


def stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)`` ``(m, *shape)``; a view, without copying, where the tensors already lie
    one after another in one storage (consecutive tensors of a memory-mapped file, as MoE experts and
    other runs of equal tensors are stored): the copy would cost as much as reading them."""
    first = tensors[0]
    numel, start = first.numel(), first.storage_offset()
    if numel == 0 or not all(t.is_contiguous() for t in tensors):
        return torch.stack(tensors)
    pointer = first.untyped_storage().data_ptr()
    for i, t in enumerate(tensors):
        if t.storage_offset() != start + i * numel or t.untyped_storage().data_ptr() != pointer:
            return torch.stack(tensors)
    return first.as_strided((len(tensors), *first.shape), (numel, *first.stride()), start)


def row_of(changes: RowChanges, i: int) -> RowChanges:
    """Row ``i`` of ``(T, k)`` changes as ``(k,)`` CPU tensors (kept for per-row output)."""
    return RowChanges(*(getattr(changes, f)[i].cpu() for f in _FIELDS))

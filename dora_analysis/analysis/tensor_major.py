"""The comparison in this process, tensor-major: one tidy row per tensor and tuned checkpoint.

This module joins the readers (which know files) and the decomposition (which knows math): it
streams one base tensor at a time and compares it against every tuned checkpoint before moving on,
so a series of T checkpoints costs about T + 1 reads, not 2T. What is compared was planned by
:func:`~dora_analysis.analysis.planning.plan_comparison`; the Ray path
(:mod:`~dora_analysis.analysis.cluster`) runs this same code on groups of tensors.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from dora_analysis.analysis import fused_rows
from dora_analysis.analysis.decomposition import (
    DeltaColumns,
    RowChanges,
    TensorDelta,
    deltas_of,
    row_changes,
    row_scalars_many,
    stack_changes,
    summarize_many,
    summarize_scalars,
)
from dora_analysis.analysis.fused_rows import single_threaded_torch
from dora_analysis.analysis.low_rank import fits as low_rank_fits
from dora_analysis.analysis.low_rank import low_rank_row_changes
from dora_analysis.analysis.planning import (
    Plan,
    RecordColumns,
    Selection,
    finished_frames,
    label_frame,
    plan_comparison,
)
from dora_analysis.analysis.spectrum import SpectrumOptions, tensor_spectra
from dora_analysis.analysis.tensor_batches import (
    BATCH_ELEMENTS,
    BATCH_TENSORS,
    GroupSummary,
    Located,
    group_summaries,
    located_summaries,
    row_of,
)
from dora_analysis.collector import young_collections_only
from dora_analysis.devices import resolve_device
from dora_analysis.readers.base import CheckpointReader, LowRankUpdate, StoredTensor
from dora_analysis.readers.layout import TensorLayout
from dora_analysis.readers.names import as_rows, split_name
from dora_analysis.schema import COLUMNS, PER_ROW_COLUMNS, metric_columns, sort_rows

__all__ = ["PathOrReader", "DENSE_GROUP_BYTES", "Spectral", "compare_in_process", "record_blocks"]

PathOrReader = str | os.PathLike | CheckpointReader

# Dense tuned tensors compared in one pass over a base tensor hold at most about this many bytes
# (counted as float32): readers that copy (pickles, merged adapters) must not pile up a series.
DENSE_GROUP_BYTES = 1 << 29


@dataclass(frozen=True)
class Spectral:
    """What the spectral metrics compute: the metric groups, options, and per tuned index the index
    of its φ reference (None: none)."""

    metrics: frozenset[str]
    options: SpectrumOptions
    references: tuple[int | None, ...] | None


def compare_in_process(
    base: PathOrReader,
    tuned: Sequence[PathOrReader],
    include: str | None = None,
    exclude: str | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
    *,
    layout: str | None = None,
    per_row: bool = False,
    metrics: Sequence[str] = ("decomposition",),
    spectrum: SpectrumOptions | None = None,
    references: Sequence[int | None] | None = None,
) -> list[pd.DataFrame]:
    """``compare_many`` in this process (see :func:`dora_analysis.analysis.comparison.compare_many`
    for the arguments; ``metrics`` as :func:`~dora_analysis.schema.parse_metrics` returns them)."""
    spectral = None
    if len(metrics) > 1 or references is not None:
        spectral = Spectral(
            frozenset(metrics),
            spectrum or SpectrumOptions(),
            tuple(references) if references is not None else None,
        )
    checked = None if device is None else resolve_device(device)
    # headers and batches keep small objects per tensor alive: no full collection for each comparison
    with young_collections_only():
        with ExitStack() as stack:
            base_reader = _open(base, stack)
            readers = [_open(t, stack, base=base_reader) for t in tuned]
            plan = plan_comparison(base_reader, readers, include, exclude, layout)
            tables = [RecordColumns() for _ in readers]
            bar = _progress_bar(sum(len(s.pairs) for s in plan.selections), progress)
            for index, block in record_blocks(base_reader, readers, plan, checked, per_row, spectral):
                bar.update(tables[index].extend(block))
            bar.close()
        if per_row:
            return [
                label_frame(_per_row_frame(t), s, plan) for t, s in zip(tables, plan.selections, strict=True)
            ]
        return finished_frames(
            tables, plan, COLUMNS + metric_columns(metrics, reference=references is not None)
        )


def _open(source: PathOrReader, stack: ExitStack, base: CheckpointReader | None = None) -> CheckpointReader:
    if isinstance(source, CheckpointReader):
        return source
    from dora_analysis.readers import open_checkpoint

    return stack.enter_context(open_checkpoint(Path(source), base=base))


def record_blocks(
    base: CheckpointReader,
    tuned: Sequence[CheckpointReader],
    plan: Plan,
    device: torch.device | None = None,
    per_row: bool = False,
    spectral: Spectral | None = None,
) -> Iterator[tuple[int, dict[str, list]]]:
    """Yield ``(index into tuned, block)``, a block being the records of one or more tensors as
    columns (equal-length lists, see :class:`~dora_analysis.analysis.planning.RecordColumns`); each
    base tensor is read once for all of ``tuned``.

    Tensors go in the base file's own order where the reader has one (``read_order``: a sharded
    checkpoint shard by shard), not the alphabetical order of a shard index. With ``per_row`` each
    block also holds ``"changes"``, each tensor's :class:`RowChanges` (``(k,)`` fields, on the CPU).

    Adapters whose reader exposes the unmerged factors (``low_rank``) are analysed from the factors,
    all of them in one pass over the base tensor (:mod:`dora_analysis.analysis.low_rank`); the other
    tuned tensors are compared in fused passes, several tuned tensors per pass over the base block
    (:func:`~dora_analysis.analysis.decomposition.row_scalars_many`), small dense tensors many at a
    time (:mod:`~dora_analysis.analysis.tensor_batches`). The block loops use every core; torch's own
    ops run single-threaded meanwhile (see :func:`~dora_analysis.analysis.fused_rows.single_threaded_torch`).
    """
    order = plan.order
    read_order = getattr(base, "read_order", None)
    if callable(read_order):
        order = read_order(order)
    layouts: dict[str, TensorLayout] = {}
    for selection in plan.selections:
        for name, found in selection.layouts.items():
            layouts.setdefault(name, found)
    with single_threaded_torch():  # entered once: toggling torch's thread count wakes spinning threads
        for batched, run in _batches(base, tuned, plan.selections, order, spectral is None):
            if batched:
                yield from _batch(base, layouts, run, device, per_row)
            else:
                name, wanted = run[0]
                yield from _one_tensor(base, layouts[name], name, wanted, device, per_row, spectral)


def _wanted(
    sides: Sequence[tuple[int, CheckpointReader, dict[str, str]]], base_name: str
) -> list[tuple[int, CheckpointReader, str]]:
    """``(tuned index, reader, tuned name)`` of every tuned checkpoint that has ``base_name``
    (``sides``: per tuned checkpoint its index, reader and selected pairs)."""
    return [(index, reader, pairs[base_name]) for index, reader, pairs in sides if base_name in pairs]


def _batches(
    base: CheckpointReader,
    tuned: Sequence[CheckpointReader],
    selections: Sequence[Selection],
    order: Sequence[str],
    batching: bool,
) -> Iterator[tuple[bool, list[tuple[str, list[tuple[int, CheckpointReader, str]]]]]]:
    """``order`` cut into runs of ``(base name, its wanted tuned tensors)``: ``(True, run)``, dense
    tensors compared in one batch (see :mod:`~dora_analysis.analysis.tensor_batches`), and
    ``(False, [one])``, a tensor compared alone (too large for a batch, factored adapters, spectral
    metrics)."""
    run: list = []
    elements = 0
    sides = [
        (index, reader, s.pairs) for index, (reader, s) in enumerate(zip(tuned, selections, strict=True))
    ]
    for name in order:
        numel = math.prod(base.shape(name))
        wanted = _wanted(sides, name)
        if not (
            batching
            and 0 < numel * (1 + len(wanted)) <= BATCH_ELEMENTS
            and all(reader.low_rank(tuned_name) is None for _, reader, tuned_name in wanted)
        ):
            if run:
                yield True, run
                run, elements = [], 0
            yield False, [(name, wanted)]
            continue
        if run and (elements + numel * (1 + len(wanted)) > BATCH_ELEMENTS or len(run) >= BATCH_TENSORS):
            yield True, run
            run, elements = [], 0
        run.append((name, wanted))
        elements += numel * (1 + len(wanted))
    if run:
        yield True, run


def _one_tensor(
    base: CheckpointReader,
    found: TensorLayout,
    base_name: str,
    wanted: list[tuple[int, CheckpointReader, str]],
    device: torch.device | None,
    per_row: bool,
    spectral: Spectral | None,
) -> Iterator[tuple[int, dict[str, list]]]:
    """The records of one base tensor, for every tuned checkpoint that has it (``wanted``)."""
    base_rows = _to(as_rows(base.get(base_name), found.layout), device)
    deltas, changes = _tensor_deltas(base_rows, wanted, found.layout, device, per_row)
    extra = _spectral_records(spectral, base_rows, wanted, found.layout, device) if spectral else {}
    facts = _name_facts(base, [base_name], {base_name: found})
    for index, delta in deltas.items():
        block = {**facts, **{field: [value] for field, value in zip(TensorDelta._fields, delta, strict=True)}}
        block.update((column, [value]) for column, value in extra.get(index, {}).items())
        if index in changes:
            block["changes"] = [changes[index]]
        yield index, block


def _batch(
    base: CheckpointReader,
    layouts: dict[str, TensorLayout],
    run: list[tuple[str, list[tuple[int, CheckpointReader, str]]]],
    device: torch.device | None,
    per_row: bool,
) -> Iterator[tuple[int, dict[str, list]]]:
    """The records of several base tensors (``(name, wanted)``; dense tuned tensors only, no
    spectral metrics), compared in a few passes, one per row shape
    (:func:`~dora_analysis.analysis.tensor_batches.group_summaries`); one block per group and
    tuned checkpoint. On the CPU, tensors every reader holds in memory are compared where they lie
    (:func:`~dora_analysis.analysis.tensor_batches.located_summaries`), with no tensor made each."""
    on_cpu = device is None or device.type == "cpu"
    located, others = _located_items(base, layouts, run) if on_cpu else ([], list(range(len(run))))
    # the records keep the memory they point at alive until the summaries are made
    groups = _positions_in(located_summaries([item for _, item in located], per_row), [p for p, _ in located])
    del located
    if others:
        items = []
        for name, wanted in (run[p] for p in others):
            layout = layouts[name].layout
            rows = [(index, _to(as_rows(reader.get(t), layout), device)) for index, reader, t in wanted]
            items.append((_to(as_rows(base.get(name), layout), device), rows))
        groups += _positions_in(group_summaries(items, per_row), others)
        del items  # readers that copy (pickles, merged adapters) hold a batch's worth here
    for group in groups:
        facts = _name_facts(base, [run[p][0] for p in group.positions], layouts)
        m = len(group.positions)
        columns = [
            (field, values.tolist())
            for field, values in zip(DeltaColumns._fields, group.summary, strict=True)
        ]
        for t, index in enumerate(group.tuned):
            block = dict(facts)
            for field, values in columns:
                block[field] = values[t * m : (t + 1) * m]
            if per_row:
                block["changes"] = [row_of(group.changes, t * m + q) for q in range(m)]
            yield index, block


# Layouts whose rows are the stored tensor's own memory, in order (a conv's flattened per channel).
_IN_PLACE_LAYOUTS = frozenset({"linear", "conv"})
_UNSET = object()


def _located_items(
    base: CheckpointReader,
    layouts: dict[str, TensorLayout],
    run: list[tuple[str, list[tuple[int, CheckpointReader, str]]]],
) -> tuple[list[tuple[int, Located]], list[int]]:
    """The tensors of ``run`` whose rows every reader holds in memory (``stored_at``), with their
    positions in ``run``, and the positions of the others: a reader without them, rows that are not
    the stored tensor's own (transposed, embedding), a format the kernel does not read in place.
    Those are read through ``get``."""
    readable: dict[torch.dtype, bool] = {}
    finders: dict[int, Callable[[str], StoredTensor | None] | None] = {}

    def rows_at(reader: CheckpointReader, name: str) -> StoredTensor | None:
        finder = finders.get(id(reader), _UNSET)
        if finder is _UNSET:
            finder = finders[id(reader)] = getattr(reader, "stored_at", None)
        found = finder(name) if finder is not None else None
        if found is None:
            return None
        ok = readable.get(found.dtype)
        if ok is None:
            ok = readable[found.dtype] = fused_rows.reads_in_place(found.dtype)
        if not ok:
            return None
        shape = found.shape
        return found if len(shape) == 2 else found._replace(shape=(shape[0], math.prod(shape[1:])))

    located: list[tuple[int, Located]] = []
    others: list[int] = []
    for position, (name, wanted) in enumerate(run):
        base_rows = rows_at(base, name) if layouts[name].layout in _IN_PLACE_LAYOUTS else None
        tuned_rows = []
        for index, reader, tuned_name in wanted if base_rows is not None else ():
            found = rows_at(reader, tuned_name)
            if found is None:
                break
            tuned_rows.append((index, found))
        if base_rows is None or len(tuned_rows) < len(wanted):
            others.append(position)
        else:
            located.append((position, (base_rows, tuned_rows)))
    return located, others


def _positions_in(groups: list[GroupSummary], positions: list[int]) -> list[GroupSummary]:
    """``groups`` of a sub-list of a run, their positions made the run's (``positions[i]``)."""
    return [group._replace(positions=[positions[p] for p in group.positions]) for group in groups]


def _name_facts(
    base: CheckpointReader, names: list[str], layouts: dict[str, TensorLayout]
) -> dict[str, list]:
    """The columns that the names, shapes and layouts give, the same for every tuned checkpoint."""
    stacks, layer_numbers, modules = zip(*map(split_name, names), strict=True)
    found = [layouts[name] for name in names]
    return {
        "tensor": names,
        "stack": list(stacks),
        "layer": list(layer_numbers),
        "module": list(modules),
        "shape": [_shape_text(base.shape(name)) for name in names],
        "layout": [f.layout for f in found],
        "layout_source": [f.source for f in found],
    }


@functools.lru_cache(maxsize=1024)
def _shape_text(shape: tuple[int, ...]) -> str:
    """``64x128`` (cached: a checkpoint has few distinct shapes)."""
    return "x".join(map(str, shape))


def _tensor_deltas(
    base_rows: torch.Tensor,
    wanted: list[tuple[int, CheckpointReader, str]],
    layout: str | None,
    device: torch.device | None,
    per_row: bool,
) -> tuple[dict[int, TensorDelta], dict[int, RowChanges]]:
    """ΔM/ΔD of one base tensor ``(k, n)`` rows against each wanted tuned tensor (by tuned index),
    and with ``per_row`` each one's row changes: factored adapters in one pass, the dense tensors in
    fused groups of at most :data:`DENSE_GROUP_BYTES`."""
    factored, dense = [], []
    for index, reader, tuned_name in wanted:
        update = reader.low_rank(tuned_name)
        if update is not None and _factored_fits(layout, base_rows, update):
            factored.append((index, update))
        else:
            dense.append((index, reader, tuned_name))
    deltas: dict[int, TensorDelta] = {}
    per_row_changes: dict[int, RowChanges] = {}

    def keep(indices: list[int], summaries: Sequence[TensorDelta], changes: RowChanges | None) -> None:
        for i, (index, delta) in enumerate(zip(indices, summaries, strict=True)):
            deltas[index] = delta
            if per_row:
                per_row_changes[index] = row_of(changes, i)

    if factored:
        changes = stack_changes(low_rank_row_changes(base_rows, [u for _, u in factored]))
        keep([i for i, _ in factored], summarize_many(changes), changes)
    per_group = max(1, DENSE_GROUP_BYTES // max(4 * base_rows.numel(), 1))
    for start in range(0, len(dense), per_group):
        group = dense[start : start + per_group]
        tuned_rows = [_to(as_rows(reader.get(name), layout), device) for _, reader, name in group]
        scalars = row_scalars_many(base_rows, tuned_rows)
        del tuned_rows
        # the summary as a batch's (summarize_scalars), so a tensor's numbers never depend on batching
        summaries = deltas_of(summarize_scalars(scalars))
        keep([i for i, _, _ in group], summaries, row_changes(scalars) if per_row else None)
    return deltas, per_row_changes


def _spectral_records(
    spectral: Spectral,
    base_rows: torch.Tensor,
    wanted: list[tuple[int, CheckpointReader, str]],
    layout: str | None,
    device: torch.device | None,
) -> dict[int, dict]:
    """Spectrum/intruder/φ columns of one base tensor for every tuned checkpoint that has it.

    LoRA/DoRA updates come from their factors where they fit (:mod:`dora_analysis.analysis.spectrum`);
    other tuned tensors are read again, one at a time, when their turn comes.
    """
    updates = []
    for _, reader, name in wanted:
        update = reader.low_rank(name)
        if update is not None and _factored_fits(layout, base_rows, update):
            updates.append(update)
        else:
            updates.append(lambda reader=reader, name=name: _to(as_rows(reader.get(name), layout), device))
    position = {index: k for k, (index, _, _) in enumerate(wanted)}
    references = None
    if spectral.references is not None:
        references = [position.get(spectral.references[index]) for index, _, _ in wanted]
    records = tensor_spectra(base_rows, updates, spectral.metrics, spectral.options, references)
    return {index: record for (index, _, _), record in zip(wanted, records, strict=True)}


def _to(rows: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return rows if device is None else rows.to(device)


def _factored_fits(layout: str | None, base_rows: torch.Tensor, update: LowRankUpdate) -> bool:
    """Factors apply to these rows: a linear or conv weight (or a ``fan_in_fan_out`` Conv1D) and 2-D
    factors (a conv's are served flattened to its rows)."""
    expected = ("transposed",) if update.fan_in_fan_out else ("linear", "conv")
    return layout in expected and low_rank_fits(base_rows, update)


def _per_row_frame(table: RecordColumns) -> pd.DataFrame:
    """One row per output unit of every tensor in ``table`` (its ``"changes"``), columns
    :data:`PER_ROW_COLUMNS`."""
    if not table.length:
        return pd.DataFrame(
            {c: pd.Series(dtype="Int64" if c == "layer" else object) for c in PER_ROW_COLUMNS}
        )
    keys = ("tensor", "stack", "layer", "module", "changes")
    parts = [_rows_of_tensor(*values) for values in zip(*(table.columns[k] for k in keys), strict=True)]
    frame = pd.concat(parts, ignore_index=True)
    keys = sort_rows(frame[["tensor", "stack", "layer", "module"]].drop_duplicates("tensor"))["tensor"]
    rank = {t: i for i, t in enumerate(keys)}
    frame = frame.iloc[frame["tensor"].map(rank).argsort(kind="stable")].reset_index(drop=True)
    return frame[PER_ROW_COLUMNS]


def _rows_of_tensor(
    tensor: str, stack: str, layer: int | None, module: str, changes: RowChanges
) -> pd.DataFrame:
    """The per-row frame of one tensor from its :class:`RowChanges`."""
    k = int(changes.valid.shape[0])
    return pd.DataFrame(
        {
            "tensor": tensor,
            "stack": stack,
            "layer": pd.array([layer] * k, dtype="Int64"),
            "module": module,
            "row": range(k),
            "base_magnitude": changes.base_magnitude.double().numpy(),
            "tuned_magnitude": changes.tuned_magnitude.double().numpy(),
            "delta_magnitude": changes.magnitude_change.double().numpy(),
            "delta_direction": changes.direction_change.double().numpy(),
        }
    )


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="tensor",
        disable=not (enabled and sys.stderr.isatty()),
        leave=False,
        file=sys.stderr,
    )

"""Compare a pre-trained checkpoint with fine-tuned ones: one tidy row per tensor.

This module joins the readers (which know files) and the decomposition (which knows math): it pairs
tensor names, streams one base tensor at a time, and compares it against every tuned checkpoint
before moving on (tensor-major), so a series of T checkpoints costs about T + 1 reads, not 2T.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from dora_analysis.analysis.decomposition import (
    RowChanges,
    TensorDelta,
    row_changes,
    row_scalars_many,
    stack_changes,
    summarize_many,
)
from dora_analysis.analysis.fused_rows import single_threaded_torch
from dora_analysis.analysis.low_rank import fits as low_rank_fits
from dora_analysis.analysis.low_rank import low_rank_row_changes
from dora_analysis.analysis.spectrum import (
    INTRUDER_COLUMNS,
    METRIC_GROUPS,
    SPECTRUM_COLUMNS,
    SUBSPACE_COLUMN,
    SpectrumOptions,
    tensor_spectra,
)
from dora_analysis.errors import InputError
from dora_analysis.readers.base import CheckpointReader, LowRankUpdate
from dora_analysis.readers.layout import ModelLayout, TensorLayout, model_layout
from dora_analysis.readers.names import as_rows, match_names, split_name

if TYPE_CHECKING:  # only for the annotation: Ray code loads when a cluster is asked for
    from dora_analysis.analysis.cluster import Cluster

__all__ = [
    "COLUMNS",
    "PER_ROW_COLUMNS",
    "LayoutWarning",
    "Selection",
    "select_tensors",
    "resolve_device",
    "compare",
    "compare_many",
    "sort_rows",
    "parse_metrics",
    "metric_columns",
]

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

# Stacks in reading order: the input side of a model before its output side; others alphabetically after.
_STACK_ORDER = ("model", "vision", "audio", "text", "encoder", "decoder")


class LayoutWarning(UserWarning):
    """Some tensors' row layout was guessed from their names (no ``config.json``, no ``layout=``)."""


PathOrReader = str | os.PathLike | CheckpointReader


@dataclass
class Selection:
    """The tensors one comparison analyses, and the names found on one side only.

    ``pairs`` maps a base name to the tuned checkpoint's name for the same tensor.
    """

    pairs: dict[str, str] = field(default_factory=dict)
    base_only: list[str] = field(default_factory=list)
    tuned_only: list[str] = field(default_factory=list)
    layouts: dict[str, TensorLayout] = field(default_factory=dict)  # base name -> its row layout


def select_tensors(
    base: CheckpointReader,
    tuned: CheckpointReader,
    include: str | None = None,
    exclude: str | None = None,
    layouts: ModelLayout | None = None,
) -> Selection:
    """Pair base and tuned names and keep the analysed ones.

    By default the 2-D ``.weight`` tensors of linear layers (``nn.Linear`` and ``Conv1D``, as
    ``layouts`` decides: default the name rule); ``include``/``exclude`` are regular
    expressions searched in the base tensor name (``include`` replaces the default selection).

    Raises:
        InputError: no tensor in common, the same tensor with two shapes, or a selected tensor that
            is not floating point (integer or quantized storage).
    """
    match = match_names(base.names(), tuned.names())
    if not match.pairs:
        raise InputError.of(
            tuned.source,
            f"no tensor in common with base {base.source} "
            f"(base has e.g. {_few(base.names())}; tuned has e.g. {_few(tuned.names())})",
        )
    include_re = re.compile(include) if include else None
    exclude_re = re.compile(exclude) if exclude else None
    selection = Selection(base_only=[] if tuned.partial else match.base_only, tuned_only=match.tuned_only)
    layouts = layouts if layouts is not None else ModelLayout()
    for base_name, tuned_name in match.pairs:
        shape = tuple(base.shape(base_name))
        layout = layouts.of(base_name, shape)
        default = base_name.endswith(".weight") and layout.layout in ("linear", "transposed")
        chosen = include_re.search(base_name) if include_re else default
        if not chosen or (exclude_re and exclude_re.search(base_name)):
            continue
        if layout.layout is None:
            continue  # 0-D/1-D tensors (biases, norms) have no rows to decompose
        tuned_shape = tuple(tuned.shape(tuned_name))
        if tuned_shape != shape:
            raise InputError.of(
                tuned.source, f"shape {list(tuned_shape)} != base shape {list(shape)}", tuned_name
            )
        for reader, name in ((base, base_name), (tuned, tuned_name)):
            dtype = reader.dtype(name)
            if not dtype.is_floating_point:
                raise InputError.of(
                    reader.source,
                    f"stored as {str(dtype).replace('torch.', '')}, expected a floating-point "
                    "weight (quantized or integer weights must be dequantized first)",
                    name,
                )
        selection.pairs[base_name] = tuned_name
        selection.layouts[base_name] = layout
    if not selection.pairs:
        what = f"--include {include!r}" if include else "the default selection (2-D linear weights)"
        raise InputError.of(tuned.source, f"no tensor in common with {base.source} matches {what}")
    return selection


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "") if names else "nothing"


def _open(source: PathOrReader, stack: ExitStack, base: CheckpointReader | None = None) -> CheckpointReader:
    if isinstance(source, CheckpointReader):
        return source
    from dora_analysis.readers import open_checkpoint

    return stack.enter_context(open_checkpoint(Path(source), base=base))


# Dense tuned tensors compared in one pass over a base tensor hold at most about this many bytes
# (counted as float32): readers that copy (pickles, merged adapters) must not pile up a series.
DENSE_GROUP_BYTES = 1 << 29


def _deltas(
    base: CheckpointReader,
    tuned: Sequence[CheckpointReader],
    selections: Sequence[Selection],
    device: str | torch.device | None = None,
    per_row: bool = False,
    spectral: _Spectral | None = None,
) -> Iterator[tuple[int, dict]]:
    """Yield ``(index into tuned, record)``; each base tensor is read once for all of ``tuned``.

    Tensors go in the base file's own order where the reader has one (``read_order``: a sharded
    checkpoint shard by shard), not the alphabetical order of a shard index. With ``per_row`` each
    record also holds ``"changes"``, that tensor's :class:`RowChanges` (``(k,)`` fields, on the CPU).

    Adapters whose reader exposes the unmerged factors (``low_rank``) are analysed from the factors,
    all of them in one pass over the base tensor (:mod:`dora_analysis.analysis.low_rank`); the other tuned
    tensors are compared in fused passes, several tuned tensors per pass over the base block
    (:func:`~dora_analysis.analysis.decomposition.row_scalars_many`). The block loops use every core; torch's
    own ops run single-threaded meanwhile (see :func:`~dora_analysis.analysis.fused_rows.single_threaded_torch`).
    """
    order = list(dict.fromkeys(name for s in selections for name in s.pairs))
    read_order = getattr(base, "read_order", None)
    if callable(read_order):
        order = read_order(order)
    with single_threaded_torch():  # entered once: toggling torch's thread count wakes spinning threads
        yield from _deltas_in_order(base, tuned, selections, order, device, per_row, spectral)


def _deltas_in_order(
    base: CheckpointReader,
    tuned: Sequence[CheckpointReader],
    selections: Sequence[Selection],
    order: list[str],
    device: str | torch.device | None,
    per_row: bool = False,
    spectral: _Spectral | None = None,
) -> Iterator[tuple[int, dict]]:
    for base_name in order:
        shape = tuple(base.shape(base_name))
        found = next(s.layouts[base_name] for s in selections if base_name in s.layouts)
        layout = found.layout
        base_rows = _to(as_rows(base.get(base_name), layout), device)
        wanted = [
            (index, reader, selection.pairs[base_name])
            for index, (reader, selection) in enumerate(zip(tuned, selections, strict=True))
            if base_name in selection.pairs
        ]
        factored, dense = [], []
        for index, reader, tuned_name in wanted:
            update = reader.low_rank(tuned_name)
            if update is not None and _factored_fits(layout, base_rows, update):
                factored.append((index, update))
            else:
                dense.append((index, reader, tuned_name))
        deltas: dict[int, TensorDelta] = {}
        per_row_changes: dict[int, RowChanges] = {}
        if factored:
            changes = stack_changes(low_rank_row_changes(base_rows, [update for _, update in factored]))
            for i, ((index, _), delta) in enumerate(zip(factored, summarize_many(changes), strict=True)):
                deltas[index] = delta
                if per_row:
                    per_row_changes[index] = _row_of(changes, i)
        per_group = max(1, DENSE_GROUP_BYTES // max(4 * base_rows.numel(), 1))
        for start in range(0, len(dense), per_group):
            group = dense[start : start + per_group]
            tuned_rows = [_to(as_rows(reader.get(name), layout), device) for _, reader, name in group]
            changes = row_changes(row_scalars_many(base_rows, tuned_rows))  # (len(group), k) each
            for i, ((index, _, _), delta) in enumerate(zip(group, summarize_many(changes), strict=True)):
                deltas[index] = delta
                if per_row:
                    per_row_changes[index] = _row_of(changes, i)
            del tuned_rows, changes
        extra = _spectral_records(spectral, base_rows, wanted, layout, device) if spectral else {}
        # What the name says is the same for every tuned checkpoint: work it out once.
        parts = split_name(base_name)
        about = {
            "tensor": base_name,
            "stack": parts.stack,
            "layer": parts.layer,
            "module": parts.module,
            "shape": "x".join(map(str, shape)),
            "layout": layout,
            "layout_source": found.source,
        }
        for index, _, _ in wanted:
            delta = deltas[index]
            yield (
                index,
                {
                    **about,
                    "rows": delta.rows,
                    "delta_magnitude": delta.delta_magnitude,
                    "delta_direction": delta.delta_direction,
                    "base_magnitude_mean": delta.base_magnitude_mean,
                    "tuned_magnitude_mean": delta.tuned_magnitude_mean,
                    "rows_excluded": delta.rows_excluded,
                    "status": delta.status,
                    **extra.get(index, {}),
                    **({"changes": per_row_changes[index]} if per_row else {}),
                },
            )
        del base_rows


def _row_of(changes: RowChanges, i: int) -> RowChanges:
    """Row ``i`` of a series' ``(T, k)`` changes as ``(k,)`` CPU tensors (kept for per-row output)."""
    fields = ("base_magnitude", "tuned_magnitude", "magnitude_change", "direction_change", "valid")
    return RowChanges(*(getattr(changes, f)[i].cpu() for f in fields))


@dataclass(frozen=True)
class _Spectral:
    """What the spectral hook computes: the metric groups, options, and per tuned index the index
    of its φ reference (None: none)."""

    metrics: frozenset[str]
    options: SpectrumOptions
    references: tuple[int | None, ...] | None


def _spectral_records(
    spectral: _Spectral,
    base_rows: torch.Tensor,
    wanted: list[tuple[int, CheckpointReader, str]],
    layout: str | None,
    device: str | torch.device | None,
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


def parse_metrics(metrics: str | Sequence[str] | None) -> tuple[str, ...]:
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
        raise InputError.of(
            "--metrics", f"unknown metric group {unknown[0]!r}; expected {', '.join(METRIC_GROUPS)}"
        )
    return tuple(g for g in METRIC_GROUPS if g in names or g == "decomposition")


def metric_columns(metrics: Sequence[str], reference: bool = False) -> list[str]:
    """The columns the groups ``metrics`` add after :data:`COLUMNS` (and φ's where ``reference``)."""
    columns = (SPECTRUM_COLUMNS if "spectrum" in metrics else []) + (
        INTRUDER_COLUMNS if "intruders" in metrics else []
    )
    return columns + ([SUBSPACE_COLUMN] if reference else [])


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` checked to be usable on this machine (None: tensors stay where the readers put them).

    Raises:
        InputError: not a torch device name, or an accelerator this torch build or machine lacks.
    """
    from dora_analysis.devices import resolve_device as checked

    return None if device is None else checked(device)


def _to(rows: torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    return rows if device is None else rows.to(device)


def _factored_fits(layout: str | None, base_rows: torch.Tensor, update: LowRankUpdate) -> bool:
    """Factors apply to these rows: a linear or conv weight (or a ``fan_in_fan_out`` Conv1D) and 2-D
    factors (a conv's are served flattened to its rows)."""
    expected = ("transposed",) if update.fan_in_fan_out else ("linear", "conv")
    return layout in expected and low_rank_fits(base_rows, update)


def compare_many(
    base: PathOrReader | None,
    tuned: Sequence[PathOrReader],
    include: str | None = None,
    exclude: str | None = None,
    progress: bool | Callable[[int], None] = False,
    device: str | torch.device | None = None,
    cluster: Cluster | str | bool | None = None,
    *,
    layout: str | None = None,
    per_row: bool = False,
    metrics: str | Sequence[str] | None = None,
    spectrum: SpectrumOptions | None = None,
    references: Sequence[int | None] | None = None,
) -> list[pd.DataFrame]:
    """Compare ``base`` against every checkpoint in ``tuned``, reading each base tensor once.

    Args:
        base: the pre-trained checkpoint (path, Hugging Face model id in the local cache, or open
            reader); None: the base an adapter's ``adapter_config.json`` names (every adapter in
            ``tuned`` must name the same one).
        tuned: fine-tuned checkpoints or adapter folders over ``base`` (paths or open readers).
        include, exclude: regular expressions on tensor names (see :func:`select_tensors`).
        progress: show a progress bar on stderr (only where stderr is a terminal); with ``cluster``
            also a callable, given the number of base tensors each finished task analysed.
        device: where the tensors are analysed (e.g. ``"cuda"``); default: where the reader puts them.
        cluster: run on Ray (``True``: a local Ray for the call; ``"auto"``/``"HOST:PORT"``: join a
            cluster; see :mod:`dora_analysis.analysis.cluster`); the frames are the same, bit for bit.
        layout: ``"auto"``/None (the model's ``config.json`` decides each tensor's layout, see
            :mod:`dora_analysis.readers.layout`), or ``"linear"``, ``"conv1d-transposed"``,
            ``"embedding"`` for every 2-D weight.
        per_row: one row per output unit instead of one per tensor (columns :data:`PER_ROW_COLUMNS`).
        metrics: metric groups, ``"decomposition,spectrum,intruders"`` or a list (see
            :func:`parse_metrics`; default ``decomposition``): ``spectrum`` adds the update's
            singular-spectrum columns, ``intruders`` ``intruder_dimensions``
            (:mod:`dora_analysis.analysis.spectrum`).
        spectrum: options of those columns (k, ε, φ's i = j, a randomised SVD).
        references: per tuned checkpoint, the index (into ``tuned``) of another one whose update
            its own is compared with by the LoRA paper's subspace similarity φ
            (column ``subspace_to_reference``), or None.
    Returns:
        One DataFrame per tuned checkpoint, columns :data:`COLUMNS`, one row per analysed tensor,
        ordered by stack, layer (a nullable integer) and module (:func:`sort_rows`); ``df.attrs``
        holds ``base_only`` and ``tuned_only`` (names found on one side only), ``layout_rule`` (what
        decided the layouts) and ``layout_ambiguous`` (tensors whose layout was guessed from the name).
    """
    if base is None:
        base = _base_of(tuned)
    groups = parse_metrics(metrics)
    if references is not None and len(references) != len(tuned):
        raise ValueError(f"references has {len(references)} entries for {len(tuned)} checkpoints")
    if cluster is not None and cluster is not False:
        from dora_analysis.analysis.cluster import compare_many_on_cluster

        if per_row:
            raise InputError.of("--per-row", "is not available with --cluster: run it in one process")
        return compare_many_on_cluster(
            base,
            tuned,
            include,
            exclude,
            progress,
            device,
            cluster,
            layout=layout,
            metrics=groups,
            spectrum=spectrum,
            references=references,
        )
    spectral = None
    if len(groups) > 1 or references is not None:
        spectral = _Spectral(
            frozenset(groups),
            spectrum or SpectrumOptions(),
            tuple(references) if references is not None else None,
        )
    columns = COLUMNS + metric_columns(groups, reference=references is not None)
    device = resolve_device(device)
    with ExitStack() as stack:
        base_reader = _open(base, stack)
        readers = [_open(t, stack, base=base_reader) for t in tuned]
        layouts = model_layout(_layout_sources(base_reader, readers), layout)
        selections = [select_tensors(base_reader, r, include, exclude, layouts) for r in readers]
        ambiguous = _warn_ambiguous(selections)
        records: list[list[dict]] = [[] for _ in readers]
        total = sum(len(s.pairs) for s in selections)
        bar = _progress_bar(total, progress)
        for index, record in _deltas(base_reader, readers, selections, device, per_row, spectral):
            records[index].append(record)
            bar.update(1)
        bar.close()
    frames = []
    for rows, selection in zip(records, selections, strict=True):
        frame = _per_row_frame(rows) if per_row else sort_rows(pd.DataFrame(rows, columns=columns))
        frame.attrs["base_only"] = selection.base_only
        frame.attrs["tuned_only"] = selection.tuned_only
        frame.attrs["layout_rule"] = layouts.rule
        frame.attrs["layout_ambiguous"] = [n for n in ambiguous if n in selection.pairs]
        frames.append(frame)
    return frames


def compare(
    base: PathOrReader | None,
    tuned: PathOrReader,
    include: str | None = None,
    exclude: str | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
    cluster: Cluster | str | bool | None = None,
    *,
    layout: str | None = None,
    per_row: bool = False,
    metrics: str | Sequence[str] | None = None,
    spectrum: SpectrumOptions | None = None,
    reference: PathOrReader | None = None,
) -> pd.DataFrame:
    """ΔM and ΔD of every analysed tensor of ``tuned`` against ``base``; see :func:`compare_many`.

    ``reference``: a second fine-tuned checkpoint of the same ``base``: the column
    ``subspace_to_reference`` holds φ(ΔW_tuned, ΔW_reference) per tensor (both updates taken from
    ``base``); the other columns are ``tuned``'s against ``base``, as without it.

    ``base`` None: an adapter's own ``base_model_name_or_path`` (a path or a cached model id).

    Example:
        >>> df = compare("base/model.safetensors", "run/checkpoint-200")  # doctest: +SKIP
        >>> df[["tensor", "delta_magnitude", "delta_direction"]]            # doctest: +SKIP
    """
    others = [tuned] if reference is None else [tuned, reference]
    return compare_many(
        base,
        others,
        include=include,
        exclude=exclude,
        progress=progress,
        device=device,
        cluster=cluster,
        layout=layout,
        per_row=per_row,
        metrics=metrics,
        spectrum=spectrum,
        references=None if reference is None else [1, None],
    )[0]


def sort_rows(frame: pd.DataFrame, first: Sequence[str] = ()) -> pd.DataFrame:
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
    return tuple(_STACK_ORDER.index(w) if w in _STACK_ORDER else len(_STACK_ORDER) for w in words)


def _per_row_frame(records: list[dict]) -> pd.DataFrame:
    """One row per output unit of every record's tensor, columns :data:`PER_ROW_COLUMNS`."""
    parts = []
    for record in records:
        changes: RowChanges = record["changes"]
        k = int(changes.valid.shape[0])
        parts.append(
            pd.DataFrame(
                {
                    "tensor": record["tensor"],
                    "stack": record["stack"],
                    "layer": pd.array([record["layer"]] * k, dtype="Int64"),
                    "module": record["module"],
                    "row": range(k),
                    "base_magnitude": changes.base_magnitude.double().numpy(),
                    "tuned_magnitude": changes.tuned_magnitude.double().numpy(),
                    "delta_magnitude": changes.magnitude_change.double().numpy(),
                    "delta_direction": changes.direction_change.double().numpy(),
                }
            )
        )
    if not parts:
        return pd.DataFrame(
            {c: pd.Series(dtype="Int64" if c == "layer" else object) for c in PER_ROW_COLUMNS}
        )
    frame = pd.concat(parts, ignore_index=True)
    keys = sort_rows(frame[["tensor", "stack", "layer", "module"]].drop_duplicates("tensor"))["tensor"]
    rank = {t: i for i, t in enumerate(keys)}
    frame = frame.iloc[frame["tensor"].map(rank).argsort(kind="stable")].reset_index(drop=True)
    return frame[PER_ROW_COLUMNS]


def _layout_sources(base: CheckpointReader, tuned: Sequence[CheckpointReader]) -> list[Path]:
    """Where a ``config.json`` may be: beside the base first, then beside each tuned checkpoint."""
    return [Path(r.source) for r in (base, *tuned)]


def _warn_ambiguous(selections: Sequence[Selection]) -> list[str]:
    """Warn (one line) about tensors whose layout only the name suggested; return their names."""
    names = list(dict.fromkeys(n for s in selections for n, layout in s.layouts.items() if layout.ambiguous))
    if names:
        first = names[0]
        layout = next(s.layouts[first] for s in selections if first in s.layouts).layout
        warnings.warn(
            f"{len(names)} tensors' layout guessed from the name, e.g. {first} read as {layout} "
            "(c_attn/c_proj/c_fc may be GPT-2's Conv1D or a Linear, embed* an Embedding or a Linear): "
            "put the model's config.json beside the weights or pass layout= / --layout",
            LayoutWarning,
            stacklevel=3,
        )
    return names


def _base_of(tuned: Sequence[PathOrReader]) -> str:
    """The one base every adapter in ``tuned`` names (``adapter_config.json``'s
    ``base_model_name_or_path``).

    Raises:
        InputError: a tuned checkpoint that is not an adapter, or adapters naming different bases.
    """
    from dora_analysis.readers import adapter_base

    bases = set()
    for source in tuned:
        if isinstance(source, CheckpointReader):
            raise InputError.of(source.source, "no base given: pass the pre-trained checkpoint")
        found = adapter_base(Path(source))
        if found is None:
            raise InputError.of(
                source,
                "no base given and this is not an adapter naming its base_model_name_or_path: "
                "pass the pre-trained checkpoint",
            )
        bases.add(found)
    if len(bases) != 1:
        raise InputError.of(tuned[0], f"the adapters name different bases: {sorted(bases)}; pass one")
    return bases.pop()


def _progress_bar(total: int, enabled: bool):
    import sys

    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="tensor",
        disable=not (enabled and sys.stderr.isatty()),
        leave=False,
        file=sys.stderr,
    )

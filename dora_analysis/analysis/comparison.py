"""Compare a pre-trained checkpoint with fine-tuned ones: one tidy row per tensor.

This module joins the readers (which know files) and the decomposition (which knows math): it pairs
tensor names, streams one base tensor at a time, and compares it against every tuned checkpoint
before moving on (tensor-major), so a series of T checkpoints costs about T + 1 reads, not 2T.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from dora_analysis.analysis.decomposition import (
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
from dora_analysis.readers.names import (
    as_rows,
    is_default_analysed,
    layer_index,
    match_names,
    module_name,
    row_layout,
)

__all__ = [
    "COLUMNS",
    "Selection",
    "select_tensors",
    "resolve_device",
    "parse_metrics",
    "metric_columns",
    "compare",
    "compare_many",
]

COLUMNS = [
    "tensor",
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
]

PathOrReader = str | os.PathLike | CheckpointReader


@dataclass
class Selection:
    """The tensors one comparison analyses, and the names found on one side only.

    ``pairs`` maps a base name to the tuned checkpoint's name for the same tensor.
    """

    pairs: dict[str, str] = field(default_factory=dict)
    base_only: list[str] = field(default_factory=list)
    tuned_only: list[str] = field(default_factory=list)


def select_tensors(
    base: CheckpointReader,
    tuned: CheckpointReader,
    include: str | None = None,
    exclude: str | None = None,
) -> Selection:
    """Pair base and tuned names and keep the analysed ones.

    By default the 2-D ``.weight`` tensors of linear layers; ``include``/``exclude`` are regular
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
    for base_name, tuned_name in match.pairs:
        shape = tuple(base.shape(base_name))
        chosen = include_re.search(base_name) if include_re else is_default_analysed(base_name, shape)
        if not chosen or (exclude_re and exclude_re.search(base_name)):
            continue
        if row_layout(base_name, shape) is None:
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
    spectral: _Spectral | None = None,
) -> Iterator[tuple[int, dict]]:
    """Yield ``(index into tuned, record)``; each base tensor is read once for all of ``tuned``.

    Adapters whose reader exposes the unmerged factors (``low_rank``) are analysed from the factors,
    all of them in one pass over the base tensor (:mod:`dora_analysis.analysis.low_rank`); the other tuned
    tensors are compared in fused passes, several tuned tensors per pass over the base block
    (:func:`~dora_analysis.analysis.decomposition.row_scalars_many`). The block loops use every core; torch's
    own ops run single-threaded meanwhile (see :func:`~dora_analysis.analysis.fused_rows.single_threaded_torch`).
    """
    order = list(dict.fromkeys(name for s in selections for name in s.pairs))
    with single_threaded_torch():  # entered once: toggling torch's thread count wakes spinning threads
        yield from _deltas_in_order(base, tuned, selections, order, device, spectral)


def _deltas_in_order(
    base: CheckpointReader,
    tuned: Sequence[CheckpointReader],
    selections: Sequence[Selection],
    order: list[str],
    device: str | torch.device | None,
    spectral: _Spectral | None = None,
) -> Iterator[tuple[int, dict]]:
    for base_name in order:
        shape = tuple(base.shape(base_name))
        layout = row_layout(base_name, shape)
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
        if factored:
            changes = stack_changes(low_rank_row_changes(base_rows, [update for _, update in factored]))
            for (index, _), delta in zip(factored, summarize_many(changes), strict=True):
                deltas[index] = delta
        per_group = max(1, DENSE_GROUP_BYTES // max(4 * base_rows.numel(), 1))
        for start in range(0, len(dense), per_group):
            group = dense[start : start + per_group]
            tuned_rows = [_to(as_rows(reader.get(name), layout), device) for _, reader, name in group]
            changes = row_changes(row_scalars_many(base_rows, tuned_rows))  # (len(group), k) each
            for (index, _, _), delta in zip(group, summarize_many(changes), strict=True):
                deltas[index] = delta
            del tuned_rows, changes
        extra = _spectral_records(spectral, base_rows, wanted, layout, device) if spectral else {}
        # What the name says is the same for every tuned checkpoint: work it out once.
        about = {
            "tensor": base_name,
            "layer": layer_index(base_name),
            "module": module_name(base_name),
            "shape": "x".join(map(str, shape)),
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
                },
            )
        del base_rows


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
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise InputError.of("--device", f"not a torch device: {device!r} ({error})") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError.of("--device", f"{device}: torch {torch.__version__} sees no CUDA GPU here")
        if resolved.index is not None and resolved.index >= count:
            raise InputError.of("--device", f"{device}: only {count} CUDA GPU(s) here")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InputError.of("--device", f"{device}: Apple's MPS is not available here")
    return resolved


def _to(rows: torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    return rows if device is None else rows.to(device)


def _factored_fits(layout: str | None, base_rows: torch.Tensor, update: LowRankUpdate) -> bool:
    """Factors apply to these rows: a linear or conv weight (or a ``fan_in_fan_out`` Conv1D) and 2-D
    factors (a conv's are served flattened to its rows)."""
    expected = ("transposed",) if update.fan_in_fan_out else ("linear", "conv")
    return layout in expected and low_rank_fits(base_rows, update)


def compare_many(
    base: PathOrReader,
    tuned: Sequence[PathOrReader],
    include: str | None = None,
    exclude: str | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
    metrics: str | Sequence[str] | None = None,
    spectrum: SpectrumOptions | None = None,
    references: Sequence[int | None] | None = None,
) -> list[pd.DataFrame]:
    """Compare ``base`` against every checkpoint in ``tuned``, reading each base tensor once.

    Args:
        base: the pre-trained checkpoint (path or open reader).
        tuned: fine-tuned checkpoints or adapter folders over ``base`` (paths or open readers).
        include, exclude: regular expressions on tensor names (see :func:`select_tensors`).
        progress: show a progress bar on stderr (only where stderr is a terminal).
        device: where the tensors are analysed (e.g. ``"cuda"``); default: where the reader puts them.
        metrics: metric groups, ``"decomposition,spectrum,intruders"`` or a list (see
            :func:`parse_metrics`; default ``decomposition``): ``spectrum`` adds the update's
            singular-spectrum columns, ``intruders`` ``intruder_dimensions``
            (:mod:`dora_analysis.analysis.spectrum`).
        spectrum: options of those columns (k, ε, φ's i = j, a randomised SVD).
        references: per tuned checkpoint, the index (into ``tuned``) of another one whose update
            its own is compared with by the LoRA paper's subspace similarity φ
            (column ``subspace_to_reference``), or None.
    Returns:
        One DataFrame per tuned checkpoint, columns :data:`COLUMNS` and then those ``metrics`` add,
        one row per analysed tensor; ``df.attrs`` holds ``base_only`` and ``tuned_only`` (names
        found on one side only).
    """
    device = resolve_device(device)
    groups = parse_metrics(metrics)
    if references is not None and len(references) != len(tuned):
        raise ValueError(f"references has {len(references)} entries for {len(tuned)} checkpoints")
    spectral = None
    if len(groups) > 1 or references is not None:
        spectral = _Spectral(
            frozenset(groups),
            spectrum or SpectrumOptions(),
            tuple(references) if references is not None else None,
        )
    columns = COLUMNS + metric_columns(groups, reference=references is not None)
    with ExitStack() as stack:
        base_reader = _open(base, stack)
        readers = [_open(t, stack, base=base_reader) for t in tuned]
        selections = [select_tensors(base_reader, r, include, exclude) for r in readers]
        records: list[list[dict]] = [[] for _ in readers]
        total = sum(len(s.pairs) for s in selections)
        bar = _progress_bar(total, progress)
        for index, record in _deltas(base_reader, readers, selections, device, spectral):
            records[index].append(record)
            bar.update(1)
        bar.close()
    frames = []
    for rows, selection in zip(records, selections, strict=True):
        frame = pd.DataFrame(rows, columns=columns)
        frame.attrs["base_only"] = selection.base_only
        frame.attrs["tuned_only"] = selection.tuned_only
        frames.append(frame)
    return frames


def compare(
    base: PathOrReader,
    tuned: PathOrReader,
    include: str | None = None,
    exclude: str | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
    metrics: str | Sequence[str] | None = None,
    spectrum: SpectrumOptions | None = None,
    reference: PathOrReader | None = None,
) -> pd.DataFrame:
    """ΔM and ΔD of every analysed tensor of ``tuned`` against ``base``; see :func:`compare_many`.

    ``reference``: a second fine-tuned checkpoint of the same ``base``: the column
    ``subspace_to_reference`` holds φ(ΔW_tuned, ΔW_reference) per tensor (both updates taken from
    ``base``); the other columns are ``tuned``'s against ``base``, as without it.

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
        metrics=metrics,
        spectrum=spectrum,
        references=None if reference is None else [1, None],
    )[0]


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

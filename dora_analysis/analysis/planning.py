"""What a comparison analyses, decided before any tensor is read: the tensor pairs, their layouts, the
order, and the frames the records become.

Both ways of running a comparison (in this process, :mod:`~dora_analysis.analysis.tensor_major`, and
on Ray, :mod:`~dora_analysis.analysis.cluster`) plan with :func:`plan_comparison` and finish with
:func:`finished_frames`, so they select, warn and label exactly alike. Only names, shapes and dtypes
are read here.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dora_analysis.errors import InputError
from dora_analysis.readers.base import CheckpointReader
from dora_analysis.readers.layout import ModelLayout, TensorLayout, model_layout
from dora_analysis.readers.names import match_names
from dora_analysis.schema import sort_rows

__all__ = [
    "LayoutWarning",
    "Selection",
    "Plan",
    "RecordColumns",
    "select_tensors",
    "layout_sources",
    "warn_ambiguous",
    "plan_comparison",
    "finished_frames",
    "label_frame",
]


class LayoutWarning(UserWarning):
    """Some tensors' row layout was guessed from their names (no ``config.json``, no ``layout=``)."""


@dataclass
class Selection:
    """The tensors one comparison analyses, and the names found on one side only.

    ``pairs`` maps a base name to the tuned checkpoint's name for the same tensor.
    """

    pairs: dict[str, str] = field(default_factory=dict)
    base_only: list[str] = field(default_factory=list)
    tuned_only: list[str] = field(default_factory=list)
    layouts: dict[str, TensorLayout] = field(default_factory=dict)  # base name -> its row layout


@dataclass(frozen=True)
class Plan:
    """One comparison of a base with several tuned checkpoints, planned.

    ``order``: every selected base tensor once, in selection order; ``layout_rule``: what decided
    the layouts; ``ambiguous``: tensors whose layout only the name suggested (warned once).
    """

    selections: list[Selection]
    order: list[str]
    layout_rule: str
    ambiguous: list[str]


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
        _check_pair(base, tuned, base_name, tuned_name, shape)
        selection.pairs[base_name] = tuned_name
        selection.layouts[base_name] = layout
    if not selection.pairs:
        what = f"--include {include!r}" if include else "the default selection (2-D linear weights)"
        raise InputError.of(tuned.source, f"no tensor in common with {base.source} matches {what}")
    return selection


def _check_pair(
    base: CheckpointReader, tuned: CheckpointReader, base_name: str, tuned_name: str, shape: tuple
) -> None:
    """The tuned tensor has the base's shape, and both are stored as floating point."""
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


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "") if names else "nothing"


def layout_sources(base: CheckpointReader, tuned: Sequence[CheckpointReader]) -> list[Path]:
    """Where a ``config.json`` may be: beside the base first, then beside each tuned checkpoint."""
    return [Path(r.source) for r in (base, *tuned)]


def warn_ambiguous(selections: Sequence[Selection]) -> list[str]:
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
            stacklevel=4,
        )
    return names


def plan_comparison(
    base: CheckpointReader,
    tuned: Sequence[CheckpointReader],
    include: str | None = None,
    exclude: str | None = None,
    layout: str | None = None,
) -> Plan:
    """Select every tuned checkpoint's tensors against ``base`` (layouts from the model's
    ``config.json`` unless ``layout`` forces one; see :func:`select_tensors`), warning once about
    layouts guessed from names."""
    layouts = model_layout(layout_sources(base, tuned), layout)
    selections = [select_tensors(base, t, include, exclude, layouts) for t in tuned]
    ambiguous = warn_ambiguous(selections)
    order = list(dict.fromkeys(name for s in selections for name in s.pairs))
    return Plan(selections, order, layouts.rule, ambiguous)


class RecordColumns:
    """One tuned checkpoint's records, column by column: ``columns`` maps a column name to its
    values, all ``length`` long (a column missing from some blocks holds None there).

    Kept as columns because thousands of tensors are compared in batches whose results are already
    columns: a dict per tensor, and a frame built from dicts, cost more than the arithmetic.
    """

    def __init__(self) -> None:
        self.columns: dict[str, list] = {}
        self.length = 0

    def extend(self, block: Mapping[str, Sequence]) -> int:
        """Append ``block`` (equal-length columns); return how many records it held."""
        n = len(next(iter(block.values()))) if block else 0
        for name, values in block.items():  # all checked before any is appended
            if len(values) != n:
                raise ValueError(f"record block column {name!r} holds {len(values)} values, not {n}")
        for name, values in block.items():
            column = self.columns.get(name)
            if column is None:
                column = self.columns[name] = [None] * self.length
            column.extend(values)
        self.length += n
        for column in self.columns.values():
            if len(column) < self.length:
                column.extend([None] * (self.length - len(column)))
        return n


def finished_frames(
    tables: Sequence[RecordColumns], plan: Plan, columns: Sequence[str]
) -> list[pd.DataFrame]:
    """One frame per tuned checkpoint from its records, in the schema's row order, with ``attrs``
    ``base_only``, ``tuned_only``, ``layout_rule`` and ``layout_ambiguous``."""
    frames = []
    for table, selection in zip(tables, plan.selections, strict=True):
        missing = [None] * table.length
        frame = pd.DataFrame({c: table.columns.get(c, missing) for c in columns}, columns=list(columns))
        frames.append(label_frame(sort_rows(frame), selection, plan))
    return frames


def label_frame(frame: pd.DataFrame, selection: Selection, plan: Plan) -> pd.DataFrame:
    """``frame`` with the ``attrs`` a comparison's frame carries (see :func:`finished_frames`)."""
    frame.attrs["base_only"] = selection.base_only
    frame.attrs["tuned_only"] = selection.tuned_only
    frame.attrs["layout_rule"] = plan.layout_rule
    frame.attrs["layout_ambiguous"] = [n for n in plan.ambiguous if n in selection.pairs]
    return frame

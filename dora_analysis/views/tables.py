"""Writing results: a DataFrame as a table, CSV, JSON or Parquet, to stdout or atomically to a file.

Every machine-readable format holds the same numbers: float64 at full precision (CSV and JSON write
the shortest text that reads back as the same double), NaN and missing integers as empty / ``null``,
integer columns (also pandas' nullable ``Int64``) as integers. Nothing here overwrites an existing
result unless asked (``overwrite=True``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from dora_analysis.atomic import atomic_path
from dora_analysis.errors import InputError

__all__ = ["Format", "FORMATS", "EXTENSIONS", "format_for", "render", "atomic_write", "write_frame"]

Format = Literal["table", "csv", "json", "parquet"]
FORMATS: tuple[str, ...] = ("table", "csv", "json", "parquet")
EXTENSIONS: dict[str, str] = {".txt": "table", ".csv": "csv", ".json": "json", ".parquet": "parquet"}


def format_for(output: str | os.PathLike | None, fmt: str | None) -> str:
    """The format to write: ``fmt`` if given, else the one ``output``'s extension names, else a table.

    Raises:
        InputError: ``fmt`` and the extension disagree, or parquet without a file.
    """
    implied = EXTENSIONS.get(Path(output).suffix.lower()) if output is not None else None
    if fmt is not None and implied is not None and fmt != implied:
        raise InputError.of(
            "--format", f"{fmt} conflicts with the extension of --output {output} ({implied})"
        )
    chosen = fmt or implied or "table"
    if chosen == "parquet" and output is None:
        raise InputError.of("--format", "parquet is binary: give --output FILE.parquet")
    return chosen


def render(frame: pd.DataFrame, fmt: Format) -> str:
    """``frame`` as text: an aligned table, CSV, or JSON (a list of records, one per row)."""
    if fmt == "csv":
        return frame.to_csv(index=False)  # floats as repr(): they read back exactly
    if fmt == "json":
        return _json(frame)
    if fmt != "table":
        raise InputError.of("--format", f"{fmt} is not a text format; expected table, csv or json")
    if frame.empty:
        return "(no rows)\n"
    return frame.to_string(index=False, formatters=_formatters(frame)) + "\n"


def _json(frame: pd.DataFrame) -> str:
    """A list of records; json.dumps writes each float as its shortest round-trip text."""
    columns = [(name, frame[name].tolist()) for name in frame.columns]
    records = [{str(name): _json_value(values[i]) for name, values in columns} for i in range(len(frame))]
    return json.dumps(records, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def _json_value(value: object) -> object:
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_value(v) for v in value]
    if isinstance(value, (str, dict)):
        return value
    return str(value)  # paths, timestamps


def _formatters(frame: pd.DataFrame) -> dict:
    def number(value: float) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"

    return {c: number for c in frame.columns if pd.api.types.is_float_dtype(frame[c])}


def atomic_write(
    path: str | os.PathLike, text: str, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`dora_analysis.atomic.atomic_path`).

    Raises:
        InputError: ``path`` exists and ``overwrite`` is False, or may not be replaced at all.
    """
    with atomic_path(path, overwrite=overwrite, inputs=inputs) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_frame(
    frame: pd.DataFrame,
    fmt: Format | None = None,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> None:
    """Render ``frame`` to ``output`` (atomically) or to stdout when ``output`` is None.

    ``fmt`` None follows ``output``'s extension (.txt, .csv, .json, .parquet), else a table.
    ``inputs`` are files the output must never replace.
    """
    fmt = format_for(output, fmt)
    if fmt == "parquet":
        with atomic_path(output, overwrite=overwrite, inputs=inputs) as temporary:
            frame.to_parquet(temporary, index=False, engine="pyarrow")
        return
    text = render(frame, fmt)
    if output is None:
        sys.stdout.write(text)
    else:
        atomic_write(output, text, overwrite=overwrite, inputs=inputs)

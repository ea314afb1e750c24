"""Writing results: a DataFrame as a table, CSV or JSON, to stdout or atomically to a file.

Nothing here overwrites an existing result unless asked (``overwrite=True``).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Literal

import pandas as pd

from dora_analysis.atomic import atomic_path

__all__ = ["Format", "render", "atomic_write", "write_frame"]

Format = Literal["table", "csv", "json"]


def render(frame: pd.DataFrame, fmt: Format) -> str:
    """``frame`` as text: an aligned table, CSV, or JSON (a list of records, one per row)."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        return frame.to_json(orient="records", indent=1) + "\n"
    if frame.empty:
        return "(no rows)\n"
    return frame.to_string(index=False, formatters=_formatters(frame)) + "\n"


def _formatters(frame: pd.DataFrame) -> dict:
    def number(value: float) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"

    return {c: number for c in frame.columns if pd.api.types.is_float_dtype(frame[c])}


def atomic_write(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`dora_analysis.atomic.atomic_path`).

    Raises:
        InputError: ``path`` exists and ``overwrite`` is False.
    """
    with atomic_path(path, overwrite=overwrite) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_frame(
    frame: pd.DataFrame, fmt: Format, output: str | os.PathLike | None = None, overwrite: bool = False
) -> None:
    """Render ``frame`` to ``output`` (atomically) or to stdout when ``output`` is None."""
    text = render(frame, fmt)
    if output is None:
        sys.stdout.write(text)
    else:
        atomic_write(output, text, overwrite=overwrite)

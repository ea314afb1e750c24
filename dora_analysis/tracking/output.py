"""The tracked frame on disk: CSV or Parquet by suffix, rewritten atomically at each flush.

A flush writes the whole frame under a temporary name and renames it (see
:mod:`dora_analysis.atomic`), so a reader, or a crash, only ever sees a complete file. A resumed run
reads the file back and keeps the rows up to the step it resumes from.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from dora_analysis.atomic import atomic_path
from dora_analysis.errors import InputError
from dora_analysis.schema import SERIES_COLUMNS

__all__ = ["FORMATS", "frame_format", "write_tracked", "read_tracked", "rows_up_to"]

FORMATS = {".csv": "csv", ".parquet": "parquet"}


def frame_format(path: str | os.PathLike) -> str:
    """``"csv"`` or ``"parquet"`` from ``path``'s suffix.

    Raises:
        InputError: another suffix.
    """
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise InputError.of(path, f"unknown output format; expected a name ending in {', '.join(FORMATS)}")
    return fmt


def write_tracked(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``frame`` to ``path`` (replacing it) in one atomic step."""
    fmt = frame_format(path)
    with atomic_path(path, overwrite=True) as temporary:
        if fmt == "parquet":
            frame.to_parquet(temporary, index=False, engine="pyarrow")
        else:
            frame.to_csv(temporary, index=False)
    return Path(path)


def read_tracked(path: str | os.PathLike) -> pd.DataFrame:
    """A tracked frame written by :func:`write_tracked` (``step``/``layer`` as nullable integers).

    Raises:
        InputError: unreadable, or without the series' columns.
    """
    fmt = frame_format(path)
    try:
        frame = pd.read_parquet(path) if fmt == "parquet" else pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise InputError.of(path, f"unreadable tracked frame ({str(error)[:120]})") from None
    missing = [c for c in SERIES_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError.of(path, f"not a tracked frame: no column {missing[0]!r}")
    return frame.astype({"step": "Int64", "layer": "Int64"})


def rows_up_to(frame: pd.DataFrame, step: int) -> pd.DataFrame:
    """The rows recorded at or before ``step`` (a run resumed at ``step`` records the later ones again)."""
    return frame[frame["step"].notna() & (frame["step"] <= step)].reset_index(drop=True)

"""Write files atomically: into a temporary name in the target's folder, then one rename.

A reader never sees a half-written file, an interrupted write leaves nothing behind, and an existing
file is replaced only when asked.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dora_analysis.errors import InputError

__all__ = ["atomic_path", "refuse_existing"]


def refuse_existing(path: str | os.PathLike, overwrite: bool) -> None:
    """Raise InputError if ``path`` exists and ``overwrite`` is False."""
    if Path(path).exists() and not overwrite:
        raise InputError.of(path, "already exists; pass --overwrite to replace it")


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    The file gets the permissions a plain ``open()`` would give (mkstemp's are 0600).

    Raises:
        InputError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        os.chmod(temporary, 0o666 & ~_umask())
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

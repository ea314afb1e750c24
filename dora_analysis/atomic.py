"""Write files atomically: into a temporary file in the target's folder, then one link or rename.

A reader never sees a half-written file, an interrupted write leaves nothing behind, and only a
regular file (or nothing) is ever replaced, and only when asked:

- without ``overwrite`` the finished file is hard-linked into place, which fails if the target
  appeared meanwhile, so a file created during the analysis is never replaced (race-free);
- with ``overwrite`` a regular file is replaced by one rename; a folder, symbolic link, device node,
  FIFO or socket never is, nor one of the inputs.

The data is fsynced before it becomes visible and the folder after, so a crash leaves the old file
or the new one. The process umask is never changed: the temporary file is created with mode 0666
and the umask applies, as for a plain ``open()``.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dora_analysis.errors import InputError

__all__ = ["atomic_path", "check_target", "fsync", "refuse_existing", "temporary_name"]

# link() is not supported everywhere (FAT, some network and FUSE file systems).
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


def temporary_name() -> str:
    """A short hidden name (22 characters): a 254-character target name still fits the 255 limit."""
    return f".dora-{secrets.token_hex(6)}.tmp"


def check_target(
    path: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike] = (), what: str = ""
) -> None:
    """Raise InputError unless ``path`` can be written: its folder exists and it is absent, or (with
    ``overwrite``) a regular file that is none of ``inputs`` and lies in none of their folders.

    ``what`` names the option in messages (e.g. ``--output``).
    """
    path = Path(path)
    where = f"{what} {path}" if what else path
    parent = path.parent
    if not parent.is_dir():
        if parent.exists():
            raise InputError.of(where, f"{parent} is a file, not a folder")
        raise InputError.of(where, f"its folder {parent} does not exist; create it first")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise InputError.of(where, "is a folder; give a file name (a new one, or a file to replace)")
    if stat.S_ISLNK(mode):
        raise InputError.of(where, "is a symbolic link; it is never replaced (give another name)")
    if not stat.S_ISREG(mode):
        raise InputError.of(
            where, "is not a regular file (a device, FIFO or socket); only regular files are written"
        )
    if _is_input(path, inputs):
        raise InputError.of(where, "is one of the inputs; inputs are never replaced")
    if not overwrite:
        raise InputError.of(where, "already exists; pass --overwrite to replace it")


def refuse_existing(path: str | os.PathLike, overwrite: bool) -> None:
    """Raise InputError if ``path`` may not be written (see :func:`check_target`)."""
    check_target(path, overwrite)


def _is_input(path: Path, inputs: Iterable[str | os.PathLike]) -> bool:
    target = path.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source or source in target.parents:
            return True
        try:
            if os.path.samefile(target, source):  # a hard link to an input
                return True
        except OSError:
            pass
    return False


@contextmanager
def atomic_path(
    path: str | os.PathLike, overwrite: bool = True, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes ``path``, on any error it is removed.

    Raises:
        InputError: ``path`` may not be written (see :func:`check_target`), checked before and again
            at the end; without ``overwrite`` a file that appears meanwhile is never replaced.
    """
    path = Path(path)
    inputs = list(inputs)
    check_target(path, overwrite, inputs)
    temporary = path.parent / temporary_name()
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
    try:
        yield temporary
        fsync(temporary)
        if overwrite:
            check_target(path, True, inputs)  # still absent or a regular file
            os.replace(temporary, path)
        else:
            _link_into_place(temporary, path)
        fsync(path.parent, folder=True)
    finally:
        temporary.unlink(missing_ok=True)  # after link() the temporary name is a second name


def _link_into_place(temporary: Path, path: Path) -> None:
    """Give the finished file its name unless that name exists by now."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise InputError.of(path, "appeared while this was written; it was not replaced") from None
    except OSError as error:
        if error.errno not in _NO_LINKS:
            raise
        # No hard links here: check, then rename (a small window remains on such file systems).
        check_target(path, False)
        os.rename(temporary, path)


def fsync(path: str | os.PathLike, folder: bool = False) -> None:
    """Flush ``path``'s data (or, ``folder=True``, a folder's entries) to disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        if folder:
            return  # some systems cannot open folders; the file itself is already on disk
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(descriptor)

"""Atomic writes keep their promise: race-free without --overwrite, only regular files replaced, no
umask change, data on disk before the name, nothing left behind."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from dora_analysis.atomic import atomic_path, check_target
from dora_analysis.errors import InputError


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_file_that_appears_during_the_write_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "deltas.csv"
    with pytest.raises(InputError, match="appeared while this was written"):
        with atomic_path(target, overwrite=False) as temporary:
            temporary.write_text("ours")
            target.write_text("theirs")  # another process, between our check and our commit
    assert target.read_text() == "theirs" and _leftovers(tmp_path) == []


def test_without_hard_links_it_still_refuses_and_writes(tmp_path: Path, monkeypatch) -> None:
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    target = tmp_path / "deltas.csv"
    with atomic_path(target, overwrite=False) as temporary:
        temporary.write_text("ours")
    assert target.read_text() == "ours"
    with pytest.raises(InputError, match="already exists"):
        with atomic_path(target, overwrite=False) as temporary:
            temporary.write_text("again")
    assert target.read_text() == "ours" and _leftovers(tmp_path) == []


def test_data_is_fsynced_before_it_gets_its_name_and_the_folder_after(tmp_path: Path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_link, real_replace = os.fsync, os.link, os.replace

    def fsync(fd):
        kind = "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(f"fsync {kind}")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", lambda *a: (events.append("name"), real_link(*a))[1])
    monkeypatch.setattr(os, "replace", lambda *a: (events.append("name"), real_replace(*a))[1])
    for overwrite in (False, True):
        events.clear()
        with atomic_path(tmp_path / "out.txt", overwrite=overwrite) as temporary:
            temporary.write_text("x")
        assert events == ["fsync file", "name", "fsync folder"], overwrite


def test_the_umask_is_never_changed_and_still_applies(tmp_path: Path, monkeypatch) -> None:
    mask = os.umask(0o027)
    try:

        def forbidden(*_):
            raise AssertionError("os.umask called: it changes the umask of every thread")

        monkeypatch.setattr(os, "umask", forbidden)
        with atomic_path(tmp_path / "out.txt", overwrite=False) as temporary:
            temporary.write_text("x")
        assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o666 & ~0o027
    finally:
        monkeypatch.undo()
        os.umask(mask)


def test_a_long_valid_name_works(tmp_path: Path) -> None:
    target = tmp_path / ("d" * 250 + ".csv")  # 254 characters: the longest name plus a few
    for overwrite in (False, True):
        with atomic_path(target, overwrite=overwrite) as temporary:
            temporary.write_text(str(overwrite))
    assert target.read_text() == "True" and _leftovers(tmp_path) == []


def _targets(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a path that may not be written even with overwrite, what the message says)."""
    (tmp_path / "kept.csv").write_text("kept")
    (tmp_path / "link.csv").symlink_to(tmp_path / "kept.csv")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "model.safetensors").write_text("weights")
    os.link(tmp_path / "input" / "model.safetensors", tmp_path / "hardlink.safetensors")
    return {
        "symlink": (tmp_path / "link.csv", "symbolic link"),
        "folder": (tmp_path / "folder", "is a folder"),
        "device": (Path("/dev/null"), "not a regular file"),
        "fifo": (tmp_path / "fifo", "not a regular file"),
        "input": (tmp_path / "input" / "model.safetensors", "one of the inputs"),
        "parent is a file": (tmp_path / "afile" / "x.csv", "is a file, not a folder"),
        "missing parent": (tmp_path / "nowhere" / "x.csv", "does not exist"),
    }


def test_only_regular_files_that_are_no_input_are_replaced(tmp_path: Path) -> None:
    cases = _targets(tmp_path)
    before = {p: (p.lstat().st_mode, p.lstat().st_ino) for p, _ in cases.values() if os.path.lexists(p)}
    for name, (path, needle) in cases.items():
        with pytest.raises(InputError, match=needle):
            check_target(path, True, inputs=[tmp_path / "input"])
        with pytest.raises(InputError, match=needle):
            with atomic_path(path, overwrite=True, inputs=[tmp_path / "input"]) as temporary:
                temporary.write_text("should never land")
        assert "--overwrite" not in str(check_message(path, tmp_path)), name  # would not help
    after = {p: (p.lstat().st_mode, p.lstat().st_ino) for p in before}
    assert after == before and (tmp_path / "kept.csv").read_text() == "kept"
    assert not (tmp_path / "nowhere").exists() and _leftovers(tmp_path) == []
    # A second name of an input is a new directory entry: replacing it leaves the input as it was.
    with atomic_path(tmp_path / "hardlink.safetensors", overwrite=True, inputs=[tmp_path / "input"]) as t:
        t.write_text("new")
    assert (tmp_path / "input" / "model.safetensors").read_text() == "weights"


def check_message(path: Path, tmp_path: Path) -> str:
    try:
        check_target(path, False, inputs=[tmp_path / "input"])
    except InputError as error:
        return str(error)
    raise AssertionError(f"{path} was accepted")


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(OSError, match="No space left"):
        with atomic_path(target, overwrite=True) as temporary:
            temporary.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device", str(temporary))
    assert target.read_text() == "old" and _leftovers(tmp_path) == []

"""Ctrl-C and SIGTERM always stop the command: exit 130 / 143, no output file, no temporary file.

Python delivers a signal as an exception at the next bytecode of the main thread. Inside a ctypes
callback (llvmlite calls Numba's object cache that way while compiling the kernel) such an exception
is printed and swallowed, and the command would run on. So the handler never raises inside
llvmlite: it records the signal and asks again a moment later, until the main thread is back in
ordinary code; and :func:`raise_if_interrupted` is checked before any output is written.
"""

from __future__ import annotations

import _thread
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Terminated", "exit_status", "handle_signals", "raise_if_interrupted"]

_RETRY_SECONDS = 0.05
_received: list[int] = []  # signals seen during the current command
_retrying = threading.Event()  # set while a recorded signal still has to reach the main thread


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup that runs on Ctrl-C runs on SIGTERM too."""


def _in_ctypes_callback(frame) -> bool:
    while frame is not None:
        if "llvmlite" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _retry(signum: int) -> None:
    # Only while the signal is still owed: once it has been raised, or the command has ended, a late
    # retry would land in whatever runs next (an atexit callback at shutdown).
    if _retrying.is_set():
        _thread.interrupt_main(signum)


def _raise(signum: int) -> None:
    _retrying.clear()
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum: int, frame) -> None:
    _received.append(signum)
    if _in_ctypes_callback(frame):  # raising here would be swallowed: ask again in a moment
        _retrying.set()
        retry = threading.Timer(_RETRY_SECONDS, _retry, (signum,))
        retry.daemon = True
        retry.start()
        return
    _raise(signum)


def raise_if_interrupted() -> None:
    """Raise the pending interrupt, if a signal arrived that could not be raised where it landed."""
    if _received:
        _raise(_received[-1])


@contextmanager
def handle_signals() -> Iterator[None]:
    """Install the handlers for SIGINT and SIGTERM while the command runs (main thread only)."""
    _received.clear()
    _retrying.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        _retrying.clear()  # the command is over: no retry may interrupt what comes after it
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def exit_status(error: KeyboardInterrupt) -> int:
    """128 + the signal number, as a shell reports a process the signal ended."""
    return 128 + (signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT)

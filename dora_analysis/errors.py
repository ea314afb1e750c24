"""The one error type users see: a single line naming the file, the tensor and what was expected."""

from __future__ import annotations

__all__ = ["DoraAnalysisError", "InputError", "LIBRARY_DETAIL", "first_line", "one_line"]

MAX_MESSAGE = 1000  # characters: a malformed record must not become a 900 KB message
MAX_PART = 300  # characters of one path or tensor name


class DoraAnalysisError(Exception):
    """Base class of every error the toolkit raises on purpose (the CLI prints it and exits 2)."""


class InputError(DoraAnalysisError):
    """A checkpoint, adapter or option that cannot be used as given.

    Build the message with :func:`InputError.of` so it always reads ``<file>: <tensor>: <problem>``,
    on one line, with control characters in names shown escaped.
    """

    @classmethod
    def of(cls, path: object, problem: str, tensor: str | None = None) -> InputError:
        parts = [one_line(path, MAX_PART)] + ([one_line(tensor, MAX_PART)] if tensor else [])
        return cls(one_line(": ".join([*parts, str(problem)]), MAX_MESSAGE))


def one_line(value: object, limit: int = MAX_MESSAGE) -> str:
    """``str(value)`` safe for a terminal line: control characters escaped, at most ``limit`` characters.

    Escaping shows a newline as ``\\n`` and ESC as ``\\x1b`` (as ``repr`` does) so a hostile tensor name
    can neither break the line nor send escape sequences to the terminal. Printable text (``Δ``,
    backslashes) is kept as is, so escaping twice changes nothing.
    """
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(value))
    if len(text) > limit:
        cut = len(text) - limit
        text = f"{text[: limit - 40]} ... [{cut + 40} characters left out]"
    return text


LIBRARY_DETAIL = 100  # characters of a library's own text kept after ours (the line stays under 300)


def first_line(error: BaseException, limit: int = LIBRARY_DETAIL) -> str:
    """The first non-empty line of an exception's message, cut to ``limit`` characters.

    Library errors can span many lines and quote whole records; our text comes first, theirs is cut.
    """
    for line in str(error).splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(error).__name__

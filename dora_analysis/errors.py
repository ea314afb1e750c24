"""The one error type users see: a single line naming the file, the tensor and what was expected."""

from __future__ import annotations

__all__ = ["DoraAnalysisError", "InputError", "one_line"]

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

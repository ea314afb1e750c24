"""The one error type users see: a single line naming the file, the tensor and what was expected."""

from __future__ import annotations

__all__ = ["DoraAnalysisError", "InputError"]


class DoraAnalysisError(Exception):
    """Base class of every error the toolkit raises on purpose (the CLI prints it and exits 2)."""


class InputError(DoraAnalysisError):
    """A checkpoint, adapter or option that cannot be used as given.

    Build the message with :func:`InputError.of` so it always reads ``<file>: <tensor>: <problem>``.
    """

    @classmethod
    def of(cls, path: object, problem: str, tensor: str | None = None) -> InputError:
        where = f"{path}: {tensor}: " if tensor else f"{path}: "
        return cls(where + problem)

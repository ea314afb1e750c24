"""Reader wrappers for a tensor-major pass: one that keeps the last tensor, one that counts reads."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dora_analysis.readers.base import CheckpointReader, ReaderWrapper

__all__ = ["ReusingReader", "MeteredReader"]


class ReusingReader(ReaderWrapper):
    """A base reader that keeps the last tensor it returned, so a second ``get`` of the same name
    (an adapter merging over the base right after the comparison read it) costs nothing.

    The comparison is tensor-major, so the last tensor is the one everybody asks for; one tensor is
    held at a time. ``on_new_tensor`` (if given) is called with 1 for every distinct read.
    """

    def __init__(self, reader: CheckpointReader, on_new_tensor: Callable[[int], None] | None = None) -> None:
        super().__init__(reader)
        self._on_new = on_new_tensor
        self._last: tuple[str, torch.Tensor] | None = None

    def get(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None  # drop the previous tensor before reading the next
            self._last = (name, self._reader.get(name))
            if self._on_new is not None:
                self._on_new(1)
        return self._last[1]

    def close(self) -> None:
        self._last = None


class MeteredReader(ReaderWrapper):
    """A reader that counts what ``get`` returns: calls per name (``reads``) and bytes (``bytes``)."""

    def __init__(self, reader: CheckpointReader) -> None:
        super().__init__(reader)
        self.reads: dict[str, int] = {}
        self.bytes = 0

    def get(self, name: str) -> torch.Tensor:
        tensor = self._reader.get(name)
        self.reads[name] = self.reads.get(name, 0) + 1
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor

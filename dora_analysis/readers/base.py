"""The one interface every checkpoint format is read through: names, then one tensor at a time.

The analysis only sees :class:`CheckpointReader`; it never knows which format it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import torch

__all__ = ["CheckpointReader", "EntryReader", "LowRankUpdate", "ReaderWrapper", "StoredTensor"]


@dataclass(frozen=True)
class LowRankUpdate:
    """A LoRA/DoRA update of one base weight, as stored in an adapter (not merged).

    The merged weight in ``(out, in)`` layout is ``W0 + scale * B @ A`` (LoRA) or
    ``magnitude[:, None] * (W0 + scale * B @ A) / ||W0 + scale * B @ A||_c`` (DoRA).

    Attributes:
        base_name: name of the base weight in the base checkpoint.
        lora_A: ``(r, in)``.
        lora_B: ``(out, r)``.
        scale: ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA), per-module patterns applied.
        magnitude: ``(out,)`` for DoRA, None for LoRA.
        fan_in_fan_out: the base weight is stored ``(in, out)`` (transformers' Conv1D).
    """

    base_name: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None
    fan_in_fan_out: bool = False


class StoredTensor(NamedTuple):
    """Where a tensor's bytes lie in this process's memory, as ``get`` would read them: ``shape``
    elements of ``dtype``, row-major and contiguous, from byte ``address``; ``keep`` holds the
    memory (a memory map) alive as long as this record is, even after its reader closes."""

    address: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    keep: object


@runtime_checkable
class CheckpointReader(Protocol):
    """Read-only access to one checkpoint's tensors, one at a time.

    ``source`` is the file or folder, for error messages. ``get`` returns a CPU tensor (possibly a
    view over a memory map: never modify it). Readers are context managers; ``close`` releases
    open files.

    Optional, outside the protocol (so that a reader without it still is one): ``stored_at(name)``,
    a :class:`StoredTensor` where ``name``'s bytes already lie in memory (a memory-mapped file),
    else None; the analysis then reads them in place instead of through ``get``.
    """

    source: Path
    #: True when the checkpoint holds only the tensors it changes (an adapter merged over a base):
    #: base tensors it lacks are unchanged by definition, not missing.
    partial: bool

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor: ...

    def low_rank(self, name: str) -> LowRankUpdate | None:
        """The unmerged factors behind ``name`` where this reader merges an adapter, else None."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> CheckpointReader: ...

    def __exit__(self, *exc: object) -> None: ...


class ReaderWrapper:
    """A reader that passes every call through to ``reader``; subclasses change what they need.

    The wrapped reader is not owned: closing the wrapper leaves it open. ``read_order`` is passed
    through too, so a wrapped sharded checkpoint is still read shard by shard.
    """

    def __init__(self, reader: CheckpointReader) -> None:
        self._reader = reader
        self.source = reader.source
        self.partial = reader.partial

    def names(self) -> list[str]:
        return self._reader.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._reader.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._reader.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self._reader.get(name)

    def low_rank(self, name: str) -> LowRankUpdate | None:
        return self._reader.low_rank(name)

    def stored_at(self, name: str) -> StoredTensor | None:
        """None: wrappers see every read through ``get`` (to count or reuse it), so none is bypassed."""
        return None

    def read_order(self, names: list[str]) -> list[str]:
        """The wrapped reader's own reading order of ``names`` (see ``ShardedReader.read_order``)."""
        inner = getattr(self._reader, "read_order", None)
        return inner(names) if callable(inner) else list(names)

    def close(self) -> None:
        pass

    def __enter__(self) -> ReaderWrapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EntryReader:
    """The name lookup of a reader built over a ``{name: entry}`` map (merged adapters, a live model):
    ``names()`` in the map's order, ``_entry(name)`` with a :class:`KeyError` naming ``source``."""

    source: Path
    _entries: dict

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.source}: no tensor {name!r}") from None

    def names(self) -> list[str]:
        return list(self._entries)

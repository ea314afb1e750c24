"""Pieces every reader shares: context-manager plumbing and the training files that are never weights."""

from __future__ import annotations

import re
from pathlib import Path

from dora_analysis.readers.base import CheckpointReader, LowRankUpdate

__all__ = ["ReaderMixin", "is_training_state_file", "WEIGHT_SUFFIXES", "first_line"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# Trainer files that hold optimizer/scheduler/RNG state or arguments, never model weights.
_TRAINING_STATE = re.compile(
    r"^(optimizer|scheduler|scaler|training_args|rng_state(_\d+)?)\.(pt|pth|bin)$"
    r"|^(optimizer|scheduler).*\.(pt|pth|bin|safetensors)$"
)


def is_training_state_file(path: Path) -> bool:
    """True for ``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``, ``training_args.bin`` and kin."""
    return bool(_TRAINING_STATE.match(path.name))


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors can span many lines)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


class ReaderMixin:
    """Context-manager methods and the default ``low_rank`` of a plain (non-adapter) reader."""

    def low_rank(self, name: str) -> LowRankUpdate | None:
        return None

    def close(self) -> None:  # pragma: no cover - overridden where something is open
        pass

    def __enter__(self) -> CheckpointReader:
        return self  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        self.close()

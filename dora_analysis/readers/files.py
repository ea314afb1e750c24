"""One weights file, whatever its format, chosen by its suffix."""

from __future__ import annotations

from pathlib import Path

from dora_analysis.errors import InputError
from dora_analysis.readers._common import is_training_state_file
from dora_analysis.readers.safetensors_file import SafetensorsReader
from dora_analysis.readers.torch_pickle import TorchPickleReader

__all__ = ["open_weight_file"]


def open_weight_file(path: Path) -> SafetensorsReader | TorchPickleReader:
    """A reader for a ``.safetensors`` file or a ``.bin``/``.pt``/``.pth`` pickle."""
    path = Path(path)
    if not path.is_file():
        raise InputError.of(path, "no such file")
    if is_training_state_file(path):
        raise InputError.of(
            path, "is a training-state file (optimizer/scheduler/RNG/arguments), not model weights"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsReader(path)
    if suffix in (".bin", ".pt", ".pth"):
        return TorchPickleReader(path)
    raise InputError.of(
        path,
        f"unknown format {suffix or '(no suffix)'!r}: expected .safetensors, .bin, .pt, .pth or a model folder",
    )

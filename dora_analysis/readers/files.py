"""One weights file, whatever its format, chosen by its suffix."""

from __future__ import annotations

from pathlib import Path

from dora_analysis.errors import InputError
from dora_analysis.readers._common import is_training_state_file, quantized_storage_problem
from dora_analysis.readers.names import canonical_name
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
    if suffix in (".safetensors", ".bin", ".pt", ".pth"):
        reader = SafetensorsReader(path) if suffix == ".safetensors" else TorchPickleReader(path)
        try:
            _check_names(path, reader.names())
        except BaseException:
            reader.close()
            raise
        return reader
    raise InputError.of(
        path,
        f"unknown format {suffix or '(no suffix)'!r}: expected .safetensors, .bin, .pt, .pth or a model folder",
    )


def _check_names(path: Path, names: list[str]) -> None:
    """Refuse quantized storage, and two tensors that are one name once wrapper prefixes are dropped
    (``X`` and ``model.X``: which one the other checkpoint means is unknown). Linear in the names."""
    quantized = quantized_storage_problem(names)
    if quantized:
        raise InputError.of(path, quantized[1], tensor=quantized[0])
    keys = list(map(canonical_name, names))
    if len(set(keys)) == len(keys):  # the usual case, without a Python step per name
        return
    seen: dict[str, str] = {}
    for name, key in zip(names, keys, strict=True):
        if key in seen:
            raise InputError.of(
                path,
                f"holds both {seen[key]!r} and {name!r}, one tensor once prefixes are dropped; ambiguous",
                tensor=name,
            )
        seen[key] = name

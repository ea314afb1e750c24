"""What a model or checkpoint folder holds, chosen as transformers 5 chooses it, opening no weights.

``from_pretrained`` (transformers 5, ``modeling_utils._get_resolved_checkpoint_files``) loads the
file ``config.json``'s ``transformers_weights`` names if any, else the first present of
``model.safetensors``, ``model.safetensors.index.json``, ``pytorch_model.bin``,
``pytorch_model.bin.index.json``: a folder holding both ``model.safetensors`` and an index that
disagrees with it is read through ``model.safetensors``, as transformers reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dora_analysis.errors import InputError
from dora_analysis.readers._common import WEIGHT_SUFFIXES, is_training_state_file, short_repr
from dora_analysis.readers.json_file import MAX_CONFIG_BYTES, read_json_object

__all__ = ["FoundWeights", "find_weights", "WEIGHT_FILES"]

# transformers' order; the first present is loaded
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class FoundWeights:
    """What a folder holds: an adapter folder, a shard index, or one weights file."""

    kind: Literal["adapter", "sharded", "file"]
    path: Path


def _found(path: Path) -> FoundWeights:
    return FoundWeights("sharded" if path.name.endswith(".index.json") else "file", path)


def find_weights(folder: Path) -> FoundWeights:
    """Detect the weights in ``folder`` (a model folder or Trainer ``checkpoint-<step>``), opening nothing."""
    if (folder / "adapter_config.json").is_file():
        return FoundWeights("adapter", folder)
    named = _named_by_config(folder)
    if named is not None:
        return _found(named)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return _found(folder / name)
    candidates = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES and not is_training_state_file(p)
    )
    if len(candidates) == 1:
        return FoundWeights("file", candidates[0])
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates[:5])
        raise InputError.of(folder, f"holds several weight files ({names}); pass the one to read")
    adapters = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "adapter_config.json").is_file())
    if len(adapters) == 1:  # PEFT saves a non-"default" adapter in a subfolder named after it
        return FoundWeights("adapter", adapters[0])
    if len(adapters) > 1:
        raise InputError.of(
            folder,
            f"holds several adapters ({', '.join(p.name for p in adapters)}); pass the adapter's folder",
        )
    raise InputError.of(
        folder,
        "no weights found (looked for adapter_config.json, model.safetensors[.index.json], "
        "pytorch_model.bin[.index.json] or one .safetensors/.bin/.pt/.pth file)",
    )


def _named_by_config(folder: Path) -> Path | None:
    """The file ``config.json``'s ``transformers_weights`` names (checked as transformers checks it)."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    name = read_json_object(config, "model config", max_bytes=MAX_CONFIG_BYTES).get("transformers_weights")
    if name is None:
        return None
    if not isinstance(name, str) or not name.endswith((".safetensors", ".safetensors.index.json")):
        raise InputError.of(
            config,
            f"transformers_weights is {short_repr(name)}; expected a .safetensors or "
            ".safetensors.index.json file name",
        )
    path = folder / name
    if folder.resolve() not in path.resolve().parents or not path.is_file():
        raise InputError.of(
            config, f"transformers_weights {short_repr(name)} is not a file inside {folder.name}/"
        )
    return path

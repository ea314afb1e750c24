"""PyTorch pickles (``.bin``, ``.pt``, ``.pth``), loaded only with ``weights_only=True``.

Zip-format files are memory-mapped (``mmap=True``), so holding the loaded dict keeps file pages,
not copies; old non-zip files cannot be mapped and are read into memory (the format allows nothing
better). Containers ``{"state_dict": ...}`` / ``{"model": ...}`` are unwrapped and ``module.``
(DDP) / ``_orig_mod.`` (torch.compile) prefixes dropped.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from dora_analysis.errors import InputError
from dora_analysis.readers._common import ReaderMixin, first_line, is_training_state_file
from dora_analysis.readers.names import strip_prefixes

__all__ = ["load_pickled_state_dict", "TorchPickleReader"]

_CONTAINER_KEYS = ("state_dict", "model", "module", "model_state_dict")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


def load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` dict in ``path`` (memory-mapped where the format allows).

    Raises :class:`InputError` for training-state files, pickles that need code execution (refused,
    never run) and files that are not PyTorch state dicts.
    """
    if is_training_state_file(path):
        raise InputError.of(
            path, "is a training-state file (optimizer/scheduler/RNG/arguments), not model weights"
        )
    obj = _safe_load(path)
    return _flatten(path, obj)


def _safe_load(path: Path) -> object:
    with warnings.catch_warnings():
        # torch warns about pickle protocols it may not fully support; our one line says what failed.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return _load(path)


def _load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap can only be used" not in str(e):
            raise InputError.of(path, f"not a readable PyTorch file ({first_line(e)})") from None
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except Exception as e:
        raise InputError.of(path, f"not a readable PyTorch file ({first_line(e)})") from None
    # An old (non-zip) torch.save file: it cannot be memory-mapped.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except Exception as e:
        raise InputError.of(path, f"not a readable PyTorch file ({first_line(e)})") from None


def _refusal(path: Path, error: pickle.UnpicklingError) -> InputError:
    text = str(error)
    if "Weights only load failed" not in text:
        return InputError.of(path, f"not a readable PyTorch file ({first_line(error)})")
    # torch puts the reason on the first non-blank line after this marker.
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    why = f": {found.group(1).strip().rstrip('.')}" if found else ""
    return InputError.of(
        path, f"refused: this pickle needs code execution to load, not only weights (weights_only=True{why})"
    )


def _flatten(path: Path, obj: object) -> dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if not isinstance(obj, dict) or _looks_like_state_dict(obj):
            break
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise InputError.of(path, f"holds a {type(obj).__name__}, not a state dict of tensors")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue  # e.g. an "epoch" counter stored beside the weights
        name = strip_prefixes(key, _STRIP_PREFIXES)
        if name in tensors:
            raise InputError.of(
                path, f"two tensors map to the same name once prefixes are dropped ({key!r})", tensor=name
            )
        tensors[name] = value
    if not tensors:
        raise InputError.of(
            path, "holds no tensors (expected a state dict, or one under 'state_dict' or 'model')"
        )
    return tensors


def _looks_like_state_dict(obj: dict) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


class TorchPickleReader(ReaderMixin):
    """A PyTorch pickle state dict; ``get`` returns views over the file's memory map."""

    partial = False

    def __init__(self, path: Path) -> None:
        self.source = Path(path)
        self._tensors: dict[str, torch.Tensor] | None = load_pickled_state_dict(self.source)

    def _dict(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            raise ValueError(f"{self.source}: reader is closed")
        return self._tensors

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self._dict()[name]
        except KeyError:
            raise KeyError(f"{self.source}: no tensor {name!r}") from None

    def names(self) -> list[str]:
        return list(self._dict())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensor(name).dtype

    def get(self, name: str) -> torch.Tensor:
        return self._tensor(name)

    def close(self) -> None:
        self._tensors = None

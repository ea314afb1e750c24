"""PyTorch pickles (``.bin``, ``.pt``, ``.pth``), loaded only with ``weights_only=True``.

Zip-format files are memory-mapped (``mmap=True``), so holding the loaded dict keeps file pages,
not copies; old non-zip files cannot be mapped and are read into memory (the format allows nothing
better). Containers ``{"state_dict": ...}`` / ``{"model": ...}`` are unwrapped and ``module.``
(DDP) / ``_orig_mod.`` (torch.compile) prefixes dropped; an ``nn.Parameter`` is read as its data.

Bounds (work and memory follow the bytes actually stored):

- zip-format files: the records may declare at most the file's size plus :data:`INFLATION_SLACK`
  bytes in all (``torch.save`` stores records uncompressed, so ``data.pkl`` cannot inflate);
  each storage's size, as the pickle claims it, must equal its record's size (a truncated record
  would otherwise be read through the memory map from its neighbour). Both are checked before
  ``torch.load`` reads any data: the pickle is first loaded onto the ``meta`` device.
- every tensor: a dense (strided) CPU tensor whose elements fit in its storage (stride-0 and
  overlapping views, e.g. ``torch.ones(1).expand(2**26, 1)``, are refused; all tensors together may
  span at most :data:`SHARED_VIEWS` times their distinct storages plus :data:`INFLATION_SLACK`, so
  many views of one storage are refused too), not sparse, meta or
  quantized, not float8, and not an empty tensor with huge dimensions
  (:func:`~dora_analysis.readers._common.stored_tensor_problem`).
"""

from __future__ import annotations

import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from dora_analysis.errors import LIBRARY_DETAIL, InputError, first_line
from dora_analysis.readers._common import (
    DEQUANTIZE,
    ReaderMixin,
    is_training_state_file,
    short_repr,
    stored_tensor_problem,
)
from dora_analysis.readers.names import strip_prefixes

__all__ = ["INFLATION_SLACK", "SHARED_VIEWS", "load_pickled_state_dict", "TorchPickleReader"]

INFLATION_SLACK = 1 << 20  # what compressed records may add beyond the file's own bytes
SHARED_VIEWS = 4  # tensors may span this many times their distinct storages (tied weights share one)

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
    mmap = True
    if zipfile.is_zipfile(path):
        mmap = _check_zip_records(path)
    obj = _safe_load(path, mmap=mmap)
    return _flatten(path, obj)


def _record_layout(path: Path) -> dict[int, tuple[str, int]]:
    """``{data offset in the file: (record name, declared size)}`` of a zip file's records.

    Raises :class:`InputError` when the records declare more than the file's size plus
    :data:`INFLATION_SLACK` bytes (a compressed ``data.pkl`` that would inflate past its file).
    """
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            declared = sum(info.file_size for info in infos)
            if declared > size + INFLATION_SLACK:
                raise InputError.of(
                    path,
                    f"zip records inflate to {declared} bytes, more than the file's {size} bytes plus "
                    f"{INFLATION_SLACK} (torch.save stores records uncompressed); refused",
                )
            _check_small_records(path, archive, infos)
            layout = {}
            with open(path, "rb") as f:
                for info in infos:
                    f.seek(info.header_offset)
                    local = f.read(30)
                    if len(local) < 30 or local[:4] != b"PK\x03\x04":
                        raise InputError.of(path, f"zip record {info.filename!r} has no local header")
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    layout[info.header_offset + 30 + name_len + extra_len] = (info.filename, info.file_size)
    except InputError:
        raise
    except Exception as e:  # zipfile raises many types for a damaged directory (NotImplementedError, ...)
        raise InputError.of(path, f"not a readable PyTorch file ({first_line(e)})") from None
    return layout


def _check_small_records(path: Path, archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> None:
    """Refuse the small records torch trusts unchecked, before ``torch.load`` sees them.

    ``byteorder`` ``big`` makes torch byte-swap storages, which crashes the process on the ``meta``
    device (SIGSEGV) and cannot be checked first; a ``.storage_alignment`` of 0 divides by zero
    (SIGFPE). Only what ``torch.save`` writes on a little-endian machine is accepted.
    """
    prefix = infos[0].filename.split("/", 1)[0] + "/" if infos and "/" in infos[0].filename else ""
    records = {info.filename.removeprefix(prefix): info for info in infos}
    for name, problem in _SMALL_RECORDS.items():
        info = records.get(name)
        if info is None:
            continue
        if info.file_size > _SMALL_RECORD_BYTES:
            raise InputError.of(path, f"zip record {name!r} holds {info.file_size} bytes; expected a few")
        text = archive.read(info)
        why = problem(text)
        if why:
            raise InputError.of(path, f"zip record {name!r} holds {short_repr(text, 40)}; {why}")


def _byteorder_problem(text: bytes) -> str | None:
    if text == b"little":
        return None
    if text == b"big":
        return (
            "a big-endian checkpoint is not read here (torch's byte swap cannot be checked first); "
            "re-save it little-endian: torch.save(torch.load(f), g) on an x86/ARM machine"
        )
    return "expected 'little'"


def _count_problem(low: int, high: int) -> Callable[[bytes], str | None]:
    def problem(text: bytes) -> str | None:
        if text.strip().isdigit() and low <= int(text) <= high:
            return None
        return f"expected an integer from {low} to {high}"

    return problem


_SMALL_RECORD_BYTES = 32
_SMALL_RECORDS: dict[str, Callable[[bytes], str | None]] = {
    "byteorder": _byteorder_problem,
    ".storage_alignment": _count_problem(1, 1 << 20),
    ".format_version": _count_problem(0, 1 << 20),
    "version": _count_problem(0, 1 << 20),
}


def _check_zip_records(path: Path) -> bool:
    """Each storage the pickle claims must be exactly the bytes of one record (checked on ``meta``).

    Returns whether the file may be memory-mapped: False when the pickle cannot be built on ``meta``
    (e.g. quantized tensors); torch's own read without the map then checks every record's size and
    reports what else is wrong (memory is then the bytes stored).
    """
    layout = _record_layout(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            meta = torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except Exception:  # e.g. no meta kernel for quantized tensors: the read without the map decides
        return False
    seen: set[int] = set()
    for key, value in _tensor_items(meta):
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            continue
        storage = value.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        if offset is None or id(storage) in seen:
            continue
        seen.add(id(storage))
        record = layout.get(offset)
        if record is None:
            raise InputError.of(
                path,
                "its storage is not at the start of any zip record; the file is damaged",
                tensor=str(key),
            )
        if record[1] != storage.nbytes():
            raise InputError.of(
                path,
                f"storage record {record[0]} holds {record[1]} bytes but the pickle claims {storage.nbytes()} "
                "(a truncated or altered file)",
                tensor=str(key),
            )
    return True


def _tensor_items(obj: object) -> list[tuple[object, object]]:
    """The (key, value) pairs of ``obj`` and of the containers :func:`_flatten` unwraps."""
    items: list[tuple[object, object]] = []
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        items.extend(obj.items())
        obj = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
    return items


def _safe_load(path: Path, *, mmap: bool = True) -> object:
    with warnings.catch_warnings():
        # torch warns about pickle protocols and sparse invariants; our one line says what failed.
        warnings.filterwarnings("ignore", category=UserWarning)
        return _load(path, mmap=mmap)


def _load(path: Path, *, mmap: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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
    why = f": {_cut(found.group(1).strip().rstrip('.'))}" if found else ""
    return InputError.of(
        path, f"refused: this pickle needs code execution to load, not only weights (weights_only=True{why})"
    )


def _cut(text: str) -> str:
    """Torch's own reason, cut so that our text stays first and the line short."""
    return text if len(text) <= LIBRARY_DETAIL else text[: LIBRARY_DETAIL - 3] + "..."


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
    viewed, storages = 0, {}  # bytes the tensors span, and the distinct storages behind them
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue  # e.g. an "epoch" counter stored beside the weights
        value = _checked(path, key, value)
        storage = value.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        viewed += value.numel() * value.element_size()
        if viewed > SHARED_VIEWS * sum(storages.values()) + INFLATION_SLACK:
            raise InputError.of(
                path,
                f"its tensors span {viewed} bytes over {sum(storages.values())} bytes stored (many views of "
                f"the same storage; at most {SHARED_VIEWS} times, as tied weights need); refused",
                tensor=key,
            )
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


def _checked(path: Path, key: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` as a plain dense tensor (a Parameter's data), or :class:`InputError` saying why not."""
    if isinstance(value, torch.nn.Parameter):
        value = value.detach()  # a common way to save weights: the data is what counts
    if value.layout != torch.strided:
        raise InputError.of(
            path,
            f"is a {str(value.layout).replace('torch.', '')} tensor; expected dense weights (save tensor.to_dense())",
            tensor=key,
        )
    if value.is_meta:
        raise InputError.of(path, "is a meta tensor: it holds a shape but no data", tensor=key)
    if value.is_quantized:
        raise InputError.of(
            path,
            f"is a quantized tensor ({str(value.dtype).replace('torch.', '')}); {DEQUANTIZE}",
            tensor=key,
        )
    problem = stored_tensor_problem(value.dtype, tuple(value.shape))
    if problem:
        raise InputError.of(path, problem, tensor=key)
    needed = value.numel() * value.element_size()
    stored = value.untyped_storage().nbytes()
    if needed > stored:
        raise InputError.of(
            path,
            f"is a view of {value.numel()} elements over a storage of {stored} bytes (stride-0 or "
            f"overlapping, strides {short_repr(value.stride())}); refused: save the tensor itself (.clone())",
            tensor=key,
        )
    return value


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

"""One ``.safetensors`` file: the header checked by hand first, then one tensor at a time via ``safe_open``."""

from __future__ import annotations

import functools
import struct
from pathlib import Path
from typing import NamedTuple

import torch

from dora_analysis.collector import paused_collector
from dora_analysis.errors import InputError, first_line
from dora_analysis.readers._common import ReaderMixin, short_repr, stored_tensor_problem
from dora_analysis.readers.base import StoredTensor
from dora_analysis.readers.json_file import parse_json

__all__ = ["MAX_HEADER_BYTES", "TensorEntry", "read_safetensors_header", "SafetensorsReader"]

# safetensors itself refuses headers above 100 MB; a larger claim means a corrupt or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class TensorEntry(NamedTuple):
    """One tensor's header record (a tuple: a header holds thousands of them, made in microseconds)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # where its bytes start in the data section (file order)


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Validate ``path``'s header without trusting it and return its tensors, in file order.

    Checks: an 8-byte little-endian header length that is below :data:`MAX_HEADER_BYTES` and fits in
    the file; a JSON object; every tensor's ``data_offsets`` inside the file and consistent with its
    dtype and shape. Raises :class:`InputError` (one line naming the file and tensor) otherwise.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError.of(
                path, f"truncated safetensors file: {size} bytes, shorter than its 8-byte header length"
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise InputError.of(
                path, f"safetensors header claims an absurd size of {n} bytes (limit {MAX_HEADER_BYTES})"
            )
        if 8 + n > size:
            raise InputError.of(
                path,
                f"truncated safetensors file: header length {n} runs past the end of the file ({size} bytes)",
            )
        raw = f.read(n)
    entries: dict[str, TensorEntry] = {}
    # The collector stays off from parsing to the last entry, and the parsed JSON is dropped before
    # it runs again: otherwise it would scan a million short-lived objects on the way (no cycles).
    with paused_collector():
        header = parse_json(path, raw, "safetensors header")
        if not isinstance(header, dict):
            raise InputError.of(path, "safetensors header is not a JSON object")
        data_bytes = size - 8 - n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entries[name] = _plain_entry(info, data_bytes) or _entry(path, name, info, data_bytes)
        del header
    return entries


# Stored formats whose common record :func:`_plain_entry` accepts (float8 codes are refused by _entry).
_PLAIN_DTYPES = {code: dtype for code, dtype in _DTYPES.items() if stored_tensor_problem(dtype, (1,)) is None}


def _plain_entry(info: object, data_bytes: int) -> TensorEntry | None:
    """The entry of a well-formed record of a non-empty tensor, checked in a few operations; None
    for anything else, which :func:`_entry` then checks in full (and explains)."""
    if type(info) is not dict or len(info) != 3:
        return None
    offsets, shape, code = info.get("data_offsets"), info.get("shape"), info.get("dtype")
    if type(offsets) is not list or len(offsets) != 2 or type(shape) is not list or type(code) is not str:
        return None
    begin, end = offsets
    dtype = _PLAIN_DTYPES.get(code)
    if dtype is None or type(begin) is not int or type(end) is not int or not 0 <= begin <= end <= data_bytes:
        return None
    numel = 1
    for d in shape:
        if type(d) is not int or d <= 0:  # an empty tensor takes the full checks
            return None
        numel *= d
    if numel * dtype.itemsize != end - begin:
        return None
    # tuple.__new__: the named tuple without its Python-level __new__ (one per tensor)
    return tuple.__new__(TensorEntry, (dtype, tuple(shape), begin))


def _entry(path: Path, name: str, info: object, data_bytes: int) -> TensorEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise InputError.of(path, "header record lacks dtype, shape or data_offsets", tensor=name)
    offsets, shape, dtype_code = info["data_offsets"], info["shape"], info["dtype"]
    # ``type(...) is int``: JSON's true/false are ints to isinstance, and never a size
    ok = (
        type(offsets) is list
        and len(offsets) == 2
        and type(offsets[0]) is int
        and type(offsets[1]) is int
        and 0 <= offsets[0] <= offsets[1]
        and type(shape) is list
        and all(type(d) is int and d >= 0 for d in shape)
    )
    if not ok:
        raise InputError.of(
            path,
            f"malformed header record (dtype {short_repr(dtype_code)}, shape {short_repr(shape)}, "
            f"data_offsets {short_repr(offsets)}): expected a shape and two offsets of non-negative integers",
            tensor=name,
        )
    if offsets[1] > data_bytes:
        raise InputError.of(
            path,
            f"truncated safetensors file: data offsets end at byte {offsets[1]} of the data, "
            f"past its end ({data_bytes} bytes)",
            tensor=name,
        )
    if not isinstance(dtype_code, str) or dtype_code not in _DTYPES:  # a list is not even hashable
        raise InputError.of(path, f"unsupported safetensors dtype {short_repr(dtype_code)}", tensor=name)
    dtype = _DTYPES[dtype_code]
    problem = stored_tensor_problem(dtype, tuple(shape))
    if problem:
        raise InputError.of(path, problem, tensor=name)
    numel = 1
    for d in shape:
        numel *= d
    if numel * dtype.itemsize != offsets[1] - offsets[0]:
        raise InputError.of(
            path,
            f"data offsets span {offsets[1] - offsets[0]} bytes but {dtype_code} {short_repr(shape)} needs {numel * dtype.itemsize}",
            tensor=name,
        )
    return TensorEntry(dtype=dtype, shape=tuple(shape), offset=offsets[0])


def _mapped_bytes(path: Path) -> torch.Tensor | None:
    """The whole file as a ``uint8`` tensor over a private (copy-on-write) memory map, as safe_open
    maps it: pages are read on first touch and writes never reach the file; None if it cannot be mapped."""
    size = path.stat().st_size
    try:
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    except (OSError, RuntimeError):
        return None
    return torch.empty(0, dtype=torch.uint8).set_(storage)


@functools.lru_cache(maxsize=1024)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of ``shape`` (cached: a checkpoint has few distinct shapes)."""
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


class SafetensorsReader(ReaderMixin):
    """A ``.safetensors`` file; ``get`` reads one tensor through the memory map."""

    partial = False

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.source = Path(path)
        self._entries = read_safetensors_header(self.source)
        with open(self.source, "rb") as f:
            self._data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        try:
            self._file = safe_open(str(self.source), framework="pt", device="cpu")
        except Exception as e:  # the library's own checks, after ours
            raise InputError.of(self.source, f"not a readable safetensors file ({first_line(e)})") from None
        self._bytes = _mapped_bytes(self.source)
        self._address = self._bytes.data_ptr() if self._bytes is not None and self._bytes.numel() else None
        self._views: dict[torch.dtype, torch.Tensor | None] = {}

    def names(self) -> list[str]:
        return list(self._entries)

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.source}: no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def get(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        start = self._start_in_map(entry)
        typed = self._typed(entry.dtype) if start is not None else None
        if typed is None:
            return self._file.get_tensor(name)
        # A view of the validated header's byte range in the file's one memory map: the same bytes
        # safe_open's get_tensor returns, without its fixed cost per call (~20 us, most of the time
        # thousands of tiny tensors took).
        return typed.as_strided(entry.shape, _contiguous_strides(entry.shape), start // entry.dtype.itemsize)

    def stored_at(self, name: str) -> StoredTensor | None:
        """The validated header's byte range of ``name`` in the file's one memory map (the bytes
        ``get`` views), or None where ``get`` would not view the map (no map, misaligned data)."""
        entry = self._entry(name)
        start = self._start_in_map(entry)
        if start is None or self._address is None:
            return None
        address = self._address + start  # tuple.__new__: as in _plain_entry
        return tuple.__new__(StoredTensor, (address, entry.dtype, entry.shape, self._bytes))

    def _start_in_map(self, entry: TensorEntry) -> int | None:
        """Where ``entry``'s bytes start in the memory map, or None where the map cannot serve them
        (no map; data not aligned to its element size)."""
        start = self._data_start + entry.offset
        return start if self._bytes is not None and start % entry.dtype.itemsize == 0 else None

    def _typed(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The mapped file viewed as ``dtype`` elements from byte 0 (its tail cut to whole elements)."""
        if dtype not in self._views:
            usable = self._bytes.numel() - self._bytes.numel() % dtype.itemsize
            self._views[dtype] = self._bytes[:usable].view(dtype) if dtype != torch.bool else None
        return self._views[dtype]

    def close(self) -> None:
        self._file = None  # safe_open handles close when released
        self._bytes = None
        self._address = None
        self._views = {}

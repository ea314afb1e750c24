"""One fused pass over row blocks on every core: per-row ``|a|^2``, ``a.d``, ``|d|^2`` in float64.

The analysis is memory-bound: its floor is reading every stored byte once. Eager torch ops make a
pass (and a temporary) per step -- convert, subtract, three multiply-and-sum -- so this module
compiles (with Numba, on first use, cached on disk) one loop per row that reads each bf16/fp16/fp32
element of the base and tuned rows once, widens it to float32 in registers (bf16: a shift of its
bits; fp16: the CPU's conversion instruction), forms ``d = w - a`` in float32 (exactly what the
float64 reference path does) and accumulates the three sums in float64, where products of float32
values are exact: the results equal the float64 path's up to summation order.

The kernel locates each row by address, so several tensors of one shape (an MoE's experts, the
projections of a layer) are compared as if stacked, ``(m * k, features)``, in one call and without the
copy a stack would make (:func:`row_sums_stacked`): a tensor's fixed cost is paid once per batch.

Rows are split into blocks drawn dynamically by one thread per core (the compiled kernels release
the GIL). Without Numba, :func:`supports` is False and callers keep their torch path.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch

from dora_analysis.analysis.row_blocks import row_ranges

__all__ = [
    "available",
    "supports",
    "row_sums",
    "row_sums_stacked",
    "reads_in_place",
    "row_sums_at",
    "run_blocks",
    "single_threaded_torch",
    "worker_count",
]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Threads draw work in blocks of about this many elements: few enough calls to keep Python's share
# small, enough blocks to balance the threads.
BLOCK_ELEMENTS = 1 << 18
# A series is compared in runs of rows of about this many base elements (64 KiB of bf16), which
# stay in cache while each tuned tensor's matching rows stream past.
SUB_ELEMENTS = 1 << 15


@functools.cache
def available() -> bool:
    """Whether Numba can be imported (the fused kernels need it)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def supports(base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> bool:
    """True where :func:`row_sums` handles these tensors: CPU, bf16/fp16/fp32, Numba importable."""
    tensors = [base, *tuned]
    return (
        all(t.device.type == "cpu" and t.dtype in _DTYPES and t.dim() == 2 for t in tensors) and available()
    )


def row_sums(base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-row float64 ``|a|^2``, ``a.d`` and ``|d|^2`` of ``base`` against each of ``tuned``.

    Args:
        base: ``(k, features)`` rows ``a``, bf16/fp16/fp32 on CPU (any strides).
        tuned: each ``(k, features)`` rows ``w``, same dtypes; ``d = w - a`` in float32.
    Returns:
        ``(len(tuned), 3, k)`` float64: for tuned ``i``, ``[i, 0]`` is ``|a|^2``, ``[i, 1]`` is
        ``a.d`` and ``[i, 2]`` is ``|d|^2``.
    """
    out = row_sums_stacked([base], [[t] for t in tuned])
    assert out is not None  # one tensor is always read, copied block by block where it must
    return out


def row_sums_stacked(
    bases: Sequence[torch.Tensor], tuned: Sequence[Sequence[torch.Tensor]]
) -> torch.Tensor | None:
    """:func:`row_sums` of ``m`` tensors of one shape as if stacked into ``(m * k, features)`` rows,
    reading each where it lies (no stacked copy).

    Args:
        bases: ``m`` tensors ``(k, features)``, bf16/fp16/fp32 on the CPU.
        tuned: ``T`` series of ``m`` tensors each, ``tuned[t][q]`` compared with ``bases[q]``.
    Returns:
        ``(T, 3, m * k)`` float64: row ``q * k + j`` is row ``j`` of tensor ``q``. None where
        ``m > 1`` and some tensor cannot be read in place (another shape, strided, on another device,
        fp16 where the CPU cannot widen it): a single tensor is then copied block by block instead.
    """
    m = len(bases)
    if any(len(series) != m for series in tuned):
        raise ValueError(f"row_sums_stacked: every tuned series needs {m} tensors")
    if not supports(bases[0], [series[0] for series in tuned]):
        return None
    base_rows = _rows_at(bases, bases[0].shape)
    series_rows = [_rows_at(series, bases[0].shape) for series in tuned]
    if m > 1 and (base_rows is None or None in series_rows):
        return None
    return _sums(base_rows, series_rows, m, *bases[0].shape, bases[0], [series[0] for series in tuned])


def reads_in_place(dtype: torch.dtype) -> bool:
    """Whether :func:`row_sums_at` reads rows stored as ``dtype`` (bf16, fp32, fp16 where the CPU
    widens it; Numba importable)."""
    return _element(dtype) is not None and available()


def row_sums_at(
    bases: Sequence[int],
    base_dtype: torch.dtype,
    tuned: Sequence[tuple[Sequence[int], torch.dtype]],
    rows: int,
    features: int,
) -> torch.Tensor:
    """:func:`row_sums_stacked` of ``m`` tensors given by address: each a row-major, contiguous
    ``(rows, features)`` array at that address of this process's memory.

    The caller guarantees every address (its bytes stay mapped and unchanged during the call): the
    kernel reads there unchecked.

    Args:
        bases: ``m`` addresses of base tensors stored as ``base_dtype``.
        tuned: ``T`` series ``(m addresses, stored dtype)``, series ``t``'s ``q``-th compared with
            ``bases[q]``.
    Returns:
        ``(T, 3, m * rows)`` float64, as :func:`row_sums_stacked`.
    Raises:
        ValueError: a dtype :func:`reads_in_place` refuses, or a series of another length.
    """
    m = len(bases)

    def table(addresses: Sequence[int], dtype: torch.dtype) -> _RowsAt:
        if not reads_in_place(dtype):
            raise ValueError(f"row_sums_at: rows stored as {dtype} cannot be read in place")
        like = _element(dtype)
        if len(addresses) != m:
            raise ValueError(f"row_sums_at: every tuned series needs {m} addresses")
        return _RowsAt(np.array([addresses], dtype=np.int64), like, features * like.itemsize)

    base_rows = table(bases, base_dtype)
    return _sums(base_rows, [table(a, dtype) for a, dtype in tuned], m, rows, features)


def _sums(
    base_rows: _RowsAt | None,
    series_rows: list[_RowsAt | None],
    m: int,
    k: int,
    features: int,
    base: torch.Tensor | None = None,
    tuned: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The kernel over ``m * k`` rows: ``(T, 3, m * k)`` float64. Rows that cannot be read in place
    (a table None; only ever with ``m == 1``) are copied from ``base``/``tuned[i]`` block by block."""
    kernel = _kernel()
    sub = max(1, SUB_ELEMENTS // max(features, 1))
    out = torch.empty(len(series_rows), 3, m * k, dtype=torch.float64)
    # Per tensor, the address of its first row: the kernel reads the storage directly and Python
    # passes only row ranges per block. Series are grouped by stored format, so that one call per
    # block serves a whole series; the rest (strided rows, fp16 where the CPU cannot widen it; only
    # ever one tensor) is copied to float32 block by block.
    groups: dict[np.dtype, list[int]] = {}
    converted = []
    for i, rows in enumerate(series_rows):
        if rows is None:
            converted.append((i, np.empty((1, 3, m * k))))
        else:
            groups.setdefault(rows.like.dtype, []).append(i)
    direct = [
        (idx, _RowsAt.of([series_rows[i] for i in idx]), np.empty((len(idx), 3, m * k)))
        for idx in groups.values()
    ]

    def work(todo: Iterator[tuple[int, int]]) -> None:
        buffers: list[torch.Tensor | None] = [None, None]
        for start, stop in todo:
            a = base_rows or _converted(base, start, stop, buffers, 0)
            for _, ws, sums in direct:
                kernel(*a.args(), *ws.args(), k, features, start, stop, sub, sums)
            for i, sums in converted:
                w = _converted(tuned[i], start, stop, buffers, 1)
                kernel(*a.args(), *w.args(), k, features, start, stop, sub, sums)

    run_blocks(base, work, row_ranges(m * k, features, BLOCK_ELEMENTS))
    for idx, _, sums in direct:
        out[idx] = torch.from_numpy(sums)
    for i, sums in converted:
        out[i] = torch.from_numpy(sums[0])
    return out


@dataclass(frozen=True)
class _RowsAt:
    """Where the kernel finds rows: row ``j`` of tensor ``q`` of series ``s`` starts at byte address
    ``addresses[s, q] + (j - origin) * row_bytes``; ``like`` is an empty array of the stored element
    type (bf16 bits as uint16, fp16 bits as int16, float32)."""

    addresses: np.ndarray  # (S, m) int64
    like: np.ndarray
    row_bytes: int
    origin: int = 0

    @classmethod
    def of(cls, series: Sequence[_RowsAt]) -> _RowsAt:
        """Several series of one element type and row length as one ``(S, m)`` table."""
        return cls(np.concatenate([s.addresses for s in series]), series[0].like, series[0].row_bytes)

    def args(self) -> tuple:
        return self.addresses, self.like, self.row_bytes, self.origin


def _element(dtype: torch.dtype) -> np.ndarray | None:
    """The empty array whose element type the kernel reads ``dtype`` as, or None where it cannot.

    The kernel tells the 16-bit formats apart by this type: bf16 bits as uint16, fp16 bits as int16
    (only where :func:`_widens_fp16` holds), float32 as float32.
    """
    if dtype == torch.bfloat16:
        return _LIKE[np.uint16]
    if dtype == torch.float16 and _widens_fp16():
        return _LIKE[np.int16]
    if dtype == torch.float32:
        return _LIKE[np.float32]
    return None


_LIKE = {t: np.empty(0, dtype=t) for t in (np.uint16, np.int16, np.float32)}


def _rows_at(tensors: Sequence[torch.Tensor], shape: torch.Size) -> _RowsAt | None:
    """Where the rows of one series lie: contiguous CPU tensors of ``shape`` and one stored format the
    kernel reads; None if any is not."""
    dtype = tensors[0].dtype
    like = _element(dtype)
    if like is None:
        return None
    addresses = []
    for t in tensors:  # every check: the kernel trusts these addresses
        if t.dtype != dtype or t.shape != shape or not t.is_cpu or not t.is_contiguous():
            return None
        addresses.append(t.data_ptr())
    return _RowsAt(np.array([addresses], dtype=np.int64), like, shape[1] * like.itemsize)


@functools.cache
def _widens_fp16() -> bool:
    """Whether the CPU converts fp16 to float32 in hardware (x86 F16C, or ARM64).

    Elsewhere LLVM would call a runtime helper that Numba's JIT does not link, so fp16 rows take the
    float32 copy instead.
    """
    import platform

    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine not in ("x86_64", "amd64"):
        return False
    import llvmlite.binding as llvm

    return bool(llvm.get_host_cpu_features().get("f16c", False))


def _converted(
    rows: torch.Tensor, start: int, stop: int, buffers: list[torch.Tensor | None], slot: int
) -> _RowsAt:
    """Rows ``start:stop`` copied to a reused float32 buffer (fp16 widens exactly; strided rows gathered)."""
    buffer = buffers[slot]
    if buffer is None or buffer.shape[0] < stop - start:
        buffer = buffers[slot] = torch.empty(stop - start, rows.shape[1], dtype=torch.float32)
    view = buffer[: stop - start]
    view.copy_(rows[start:stop])
    # the buffer's row 0 is row ``start``
    return _RowsAt(
        np.array([[view.data_ptr()]], dtype=np.int64), _LIKE[np.float32], view.stride(0) * 4, start
    )


class _SharedBlocks:
    """An iterator over row blocks that several threads draw from (each block goes to one)."""

    def __init__(self, todo: list[tuple[int, int]]) -> None:
        self._todo = todo
        self._next = itertools.count()  # next() on a count is atomic

    def __iter__(self) -> _SharedBlocks:
        return self

    def __next__(self) -> tuple[int, int]:
        i = next(self._next)
        if i >= len(self._todo):
            raise StopIteration
        return self._todo[i]


_POOL: tuple[ThreadPoolExecutor, int] | None = None  # (pool, its size), grown on demand
_POOL_LOCK = threading.Lock()


def _helpers(n: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[1] < n:
            _POOL = (ThreadPoolExecutor(max_workers=n, thread_name_prefix="dora_analysis"), n)
        return _POOL[0]


# Threads the block loops use inside :func:`single_threaded_torch` (torch's own count is 1 there).
_WORKERS: ContextVar[int | None] = ContextVar("dora_analysis_workers", default=None)


def worker_count() -> int:
    """Threads the block loops (and large SVDs) may use: one per core as seen outside
    :func:`single_threaded_torch`, whose inside runs torch ops on one thread."""
    return _WORKERS.get() or torch.get_num_threads()


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Inside, torch ops run on one thread while :func:`run_blocks` keeps one thread per core.

    The per-row vector ops between block loops (a few thousand elements each) gain nothing from
    intra-op threads, and on a loaded machine every parallel region stalls until each of its
    threads gets a core back, a scheduler slice per op. Enter it once around a whole loop:
    switching torch's thread count back and forth leaves its idle threads spinning on the core
    the block loops need.
    """
    workers = worker_count()
    token = _WORKERS.set(workers)
    previous = torch.get_num_threads()
    if previous != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if previous != 1:
            torch.set_num_threads(previous)
        _WORKERS.reset(token)


def run_blocks(
    rows: torch.Tensor | None,
    work: Callable[[Iterator[tuple[int, int]]], None],
    todo: list[tuple[int, int]],
) -> None:
    """Run ``work(blocks)`` on one thread per core, the threads sharing the blocks ``todo`` (one
    thread where ``rows``, the tensor worked on, is not on the CPU; None: rows in CPU memory).

    Each thread draws whole blocks and runs its torch ops single-threaded: intra-op threads meet at
    a barrier after every op, which stalls for a whole scheduler slice whenever another process holds
    a core, while blocks drawn dynamically keep every core busy and degrade gracefully under load.
    The thread count is ``torch.get_num_threads()`` (as it was outside :func:`single_threaded_torch`).
    """
    workers = worker_count()
    threads = min(workers, len(todo)) if rows is None or rows.device.type == "cpu" else 1
    if threads <= 1:
        work(iter(todo))
        return
    shared = _SharedBlocks(todo)
    with single_threaded_torch():  # this thread's torch ops, and the helpers' (they start single-threaded)
        futures = [_helpers(threads - 1).submit(work, shared) for _ in range(threads - 1)]
        try:
            work(shared)
        finally:
            for future in futures:
                future.result()


# The kernel, as plain Python compiled by Numba on first use. ``_row`` makes a row's address into an
# array, with no copy; ``_widen`` turns one stored element into float32 in registers, so the loop
# reads each byte once with no scratch copy: bf16 bits (as uint16) shifted into the high half of a
# float32, fp16 bits (as int16) through the CPU's conversion, float32 as is.


def _widen(x):  # pragma: no cover - replaced by the Numba overload below
    raise NotImplementedError


def _row(address, like, n):  # pragma: no cover - replaced by the Numba overload below
    raise NotImplementedError


def _rows(
    a_at, a_like, a_bytes, a_origin, w_at, w_like, w_bytes, w_origin, k, n, start, stop, sub, sums
):  # pragma: no cover - runs compiled
    """Rows ``start:stop`` of ``sums`` (``(T, 3, m * k)``): ``sums[t]`` from the base rows (tensor
    ``q = j // k``, row ``j % k``, located as :class:`_RowsAt` says) and series ``t``'s same rows.

    A series goes ``sub`` rows at a time: those base rows stay in cache while each tuned tensor's
    ``sub`` rows stream past them, one long sequential read per tensor.
    """
    for s in range(start, stop, sub):
        for t in range(w_at.shape[0]):
            for j in range(s, min(s + sub, stop)):
                ja, jw = j - a_origin, j - w_origin
                a = _row(a_at[0, ja // k] + (ja % k) * a_bytes, a_like, n)
                w = _row(w_at[t, jw // k] + (jw % k) * w_bytes, w_like, n)
                b = 0.0
                x = 0.0
                r = 0.0
                if t == 0:  # |a|^2 alongside the first tuned tensor's sums
                    for i in range(n):
                        ai = _widen(a[i])
                        af = np.float64(ai)
                        df = np.float64(_widen(w[i]) - ai)  # d formed in float32, as the reference does
                        b += af * af
                        x += af * df
                        r += df * df
                else:
                    b = sums[0, 0, j]
                    for i in range(n):
                        ai = _widen(a[i])
                        df = np.float64(_widen(w[i]) - ai)
                        x += np.float64(ai) * df
                        r += df * df
                sums[t, 0, j] = b
                sums[t, 1, j] = x
                sums[t, 2, j] = r


@functools.cache
def _kernel():
    import llvmlite.ir as ir
    import numba
    from numba import types
    from numba.extending import intrinsic, overload

    @intrinsic
    def bf16_bits_to_float32(typingctx, bits):  # pragma: no cover - runs compiled
        def codegen(context, builder, signature, args):
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())

        return types.float32(types.uint16), codegen

    @intrinsic
    def fp16_bits_to_float32(typingctx, bits):  # pragma: no cover - runs compiled
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(types.int16), codegen

    @intrinsic
    def pointer_to(typingctx, address, like):  # pragma: no cover - runs compiled
        pointer = types.CPointer(like.dtype)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(pointer))

        return pointer(types.int64, like), codegen

    @overload(_widen)
    def _widen_impl(x):  # pragma: no cover - runs compiled
        if x == types.uint16:
            return lambda x: bf16_bits_to_float32(x)
        if x == types.int16:
            return lambda x: fp16_bits_to_float32(x)
        return lambda x: np.float32(x)

    @overload(_row)
    def _row_impl(address, like, n):  # pragma: no cover - runs compiled
        return lambda address, like, n: numba.carray(pointer_to(address, like), n)

    # reassoc lets LLVM vectorise the float64 sums (several partial sums); contract allows FMA,
    # harmless since the products are exact in float64.
    return numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "contract"})(_rows)

"""One fused pass over row blocks on every core: per-row ``|a|^2``, ``a.d``, ``|d|^2`` in float64.

The analysis is memory-bound: its floor is reading every stored byte once. Eager torch ops make a
pass (and a temporary) per step -- convert, subtract, three multiply-and-sum -- so this module
compiles (with Numba, on first use, cached on disk) one loop per row that reads each bf16/fp16/fp32
element of the base and tuned rows once, widens it to float32 in registers (bf16: a shift of its
bits; fp16: the CPU's conversion instruction), forms ``d = w - a`` in float32 (exactly what the
float64 reference path does) and accumulates the three sums in float64, where products of float32
values are exact: the results equal the float64 path's up to summation order.

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

import numpy as np
import torch

from dora_analysis.analysis.row_blocks import row_blocks

__all__ = ["available", "supports", "row_sums", "run_blocks", "single_threaded_torch", "worker_count"]

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
    kernel = _kernel()
    k, features = base.shape
    sub = max(1, SUB_ELEMENTS // max(features, 1))
    out = torch.empty(len(tuned), 3, k, dtype=torch.float64)
    # Whole-tensor views where the kernel can read the storage directly (per block, Python passes
    # only row ranges), grouped by dtype so that one call per block serves a whole series; the rest
    # (strided rows, fp16 where the CPU cannot widen it) is copied to float32 block by block.
    base_view = _direct_view(base)
    views = [_direct_view(t) for t in tuned]
    groups: dict[np.dtype, list[int]] = {}
    for i, view in enumerate(views):
        if view is not None:
            groups.setdefault(view.dtype, []).append(i)
    direct = [(idx, _series([views[i] for i in idx]), np.empty((len(idx), 3, k))) for idx in groups.values()]
    converted = [(i, np.empty((1, 3, k))) for i, view in enumerate(views) if view is None]

    def work(todo: Iterator[tuple[int, int]]) -> None:
        buffers: list[torch.Tensor | None] = [None, None]
        for start, stop in todo:
            if base_view is not None:
                a, a0 = base_view, start
            else:
                a, a0 = _converted(base, start, stop, buffers, 0), 0
            for _, ws, sums in direct:
                kernel(a, a0, ws, start, start, stop, sub, sums)
            for i, sums in converted:
                kernel(a, a0, (_converted(tuned[i], start, stop, buffers, 1),), 0, start, stop, sub, sums)

    run_blocks(base, work, row_blocks(base, BLOCK_ELEMENTS))
    for idx, _, sums in direct:
        out[idx] = torch.from_numpy(sums)
    for i, sums in converted:
        out[i] = torch.from_numpy(sums[0])
    return out


def _series(arrays: list[np.ndarray]):
    """The kernel's ``ws``: one array as a 1-tuple (typed in about a microsecond, the common pair),
    several as a Numba typed list (one compiled kernel for any length, ~10 us per array to build)."""
    if len(arrays) == 1:
        return (arrays[0],)
    from numba.typed import List

    return List(arrays)


def _direct_view(rows: torch.Tensor) -> np.ndarray | None:
    """A C-contiguous NumPy view of ``rows`` the kernel reads as is, or None.

    The kernel tells the 16-bit formats apart by the view's dtype: bf16 bits as uint16, fp16 bits
    as int16 (only where :func:`_widens_fp16` holds), float32 as float32.
    """
    if not rows.is_contiguous():
        return None
    if rows.dtype == torch.bfloat16:
        return rows.view(torch.int16).numpy().view(np.uint16)
    if rows.dtype == torch.float16 and _widens_fp16():
        return rows.view(torch.int16).numpy()
    if rows.dtype == torch.float32:
        return rows.numpy()
    return None


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
) -> np.ndarray:
    """Rows ``start:stop`` copied to a reused float32 buffer (fp16 widens exactly; strided rows gathered)."""
    buffer = buffers[slot]
    if buffer is None or buffer.shape[0] < stop - start:
        buffer = buffers[slot] = torch.empty(stop - start, rows.shape[1], dtype=torch.float32)
    view = buffer[: stop - start]
    view.copy_(rows[start:stop])
    return view.numpy()


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
    rows: torch.Tensor,
    work: Callable[[Iterator[tuple[int, int]]], None],
    todo: list[tuple[int, int]],
) -> None:
    """Run ``work(blocks)`` on one thread per core, the threads sharing the blocks ``todo``.

    Each thread draws whole blocks and runs its torch ops single-threaded: intra-op threads meet at
    a barrier after every op, which stalls for a whole scheduler slice whenever another process holds
    a core, while blocks drawn dynamically keep every core busy and degrade gracefully under load.
    The thread count is ``torch.get_num_threads()`` (as it was outside :func:`single_threaded_torch`).
    """
    workers = worker_count()
    threads = min(workers, len(todo)) if rows.device.type == "cpu" else 1
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


# The kernel, as plain Python compiled by Numba on first use. ``_widen`` turns one stored element
# into float32 in registers, so the loop reads each byte once with no scratch copy: bf16 bits (as
# uint16) shifted into the high half of a float32, fp16 bits (as int16) through the CPU's conversion,
# float32 as is.


def _widen(x):  # pragma: no cover - replaced by the Numba overload below
    raise NotImplementedError


def _rows(a, a0, ws, w0, start, stop, sub, sums):  # pragma: no cover - runs compiled
    """Rows ``start:stop`` of ``sums`` (``(T, 3, k)``): ``sums[t]`` from row ``a0 + j - start`` of ``a``
    and row ``w0 + j - start`` of ``ws[t]``.

    A series goes ``sub`` rows at a time: those base rows stay in cache while each tuned tensor's
    ``sub`` rows stream past them, one long sequential read per tensor.
    """
    n = a.shape[1]
    for s in range(start, stop, sub):
        for t in range(len(ws)):
            w = ws[t]
            for j in range(s, min(s + sub, stop)):
                ja, jw = a0 + j - start, w0 + j - start
                b = 0.0
                x = 0.0
                r = 0.0
                if t == 0:  # |a|^2 alongside the first tuned tensor's sums
                    for i in range(n):
                        ai = _widen(a[ja, i])
                        af = np.float64(ai)
                        df = np.float64(_widen(w[jw, i]) - ai)  # d formed in float32, as the reference does
                        b += af * af
                        x += af * df
                        r += df * df
                else:
                    b = sums[0, 0, j]
                    for i in range(n):
                        ai = _widen(a[ja, i])
                        df = np.float64(_widen(w[jw, i]) - ai)
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

    @overload(_widen)
    def _widen_impl(x):  # pragma: no cover - runs compiled
        if x == types.uint16:
            return lambda x: bf16_bits_to_float32(x)
        if x == types.int16:
            return lambda x: fp16_bits_to_float32(x)
        return lambda x: np.float32(x)

    # reassoc lets LLVM vectorise the float64 sums (several partial sums); contract allows FMA,
    # harmless since the products are exact in float64.
    return numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "contract"})(_rows)

"""Splitting a matrix's rows into blocks of about a fixed number of elements.

Every row-wise pass (the torch fallback, the fused kernel, the factored adapters) walks rows in such
blocks, so that temporaries stay cache-sized on a CPU and a block is one large kernel on a GPU.
"""

from __future__ import annotations

import torch

__all__ = ["CPU_BLOCK_ELEMENTS", "DEVICE_BLOCK_ELEMENTS", "row_blocks", "row_ranges"]

CPU_BLOCK_ELEMENTS = 1 << 18  # about 1 MB of float32: stays in L2 with its temporaries
DEVICE_BLOCK_ELEMENTS = 1 << 24  # on an accelerator each block is a kernel launch: few, large ones


def row_blocks(rows: torch.Tensor, elements: int | None = None) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges over the rows of ``rows`` ``(k, features)``, about ``elements`` each.

    ``elements`` defaults by device (:data:`CPU_BLOCK_ELEMENTS` or :data:`DEVICE_BLOCK_ELEMENTS`); a
    block holds at least one row.

    Example:
        >>> row_blocks(torch.zeros(5, 4), elements=8)
        [(0, 2), (2, 4), (4, 5)]
    """
    if elements is None:
        elements = CPU_BLOCK_ELEMENTS if rows.device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    k, features = rows.shape
    return row_ranges(k, features, elements)


def row_ranges(rows: int, features: int, elements: int) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges over ``rows`` rows of ``features`` elements, about ``elements`` each
    (at least one row), as :func:`row_blocks` cuts a tensor's."""
    step = max(1, elements // max(features, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]

"""Per-row changes of LoRA/DoRA updates from their factors, without forming any merged weight.

With ``Δ = s B A`` (``A`` ``(r, in)``, ``B`` ``(out, r)``) and base rows ``a = W0_j``, the three
reductions the analysis needs (see :class:`~dora_analysis.analysis.decomposition.RowScalars`) are

- ``|a|^2`` from ``W0`` alone;
- ``a . Δ_j = s B_j . (W0 A^T)_j``: one ``(out, r)`` product with the base;
- ``|Δ_j|^2 = s^2 B_j (A A^T) B_j^T``: an ``(r, r)`` Gram matrix, no base at all;

and for DoRA the merged row ``m_j V_j / |V_j|`` (``V = W0 + Δ``) has magnitude exactly ``|m_j|`` and
the direction of ``V_j`` (reversed where ``m_j < 0``). So one pass over ``W0`` serves every adapter of
a series: their ``A`` are stacked and ``W0 A_all^T`` is computed once, blockwise. The per-row scalars
are combined in float64 and ``1 - cos`` comes from Lagrange's identity as in
:func:`~dora_analysis.analysis.decomposition.row_changes`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from dora_analysis.analysis.decomposition import RowChanges, RowScalars, row_changes
from dora_analysis.analysis.fused_rows import run_blocks
from dora_analysis.analysis.row_blocks import row_blocks
from dora_analysis.factors import Factors

__all__ = ["MAX_STACKED_RANK", "fits", "factored_scalars", "low_rank_row_changes"]


# Adapters are stacked until their ranks add up to this many columns of ``W0 A_all^T``; more are
# handled in further passes over W0, so the ``(out, total rank)`` product stays small.
MAX_STACKED_RANK = 1024
# Rows per CPU block: W0's rows meet the stacked factors in a matrix product, whose (rows, R)
# output also has to stay in cache, so half the plain passes' block.
BLOCK_ELEMENTS = 1 << 17


def fits(base_rows: torch.Tensor, update: Factors) -> bool:
    """Whether ``update``'s 2-D factors match ``base_rows`` ``(out, in)`` (no conv or embedding factors)."""
    a, b = update.lora_A, update.lora_B
    if base_rows.dim() != 2 or a.dim() != 2 or b.dim() != 2:
        return False
    out, features = base_rows.shape
    ok = a.shape[1] == features and b.shape == (out, a.shape[0])
    return ok and (update.magnitude is None or tuple(update.magnitude.shape) == (out,))


def factored_scalars(base_rows: torch.Tensor, updates: Sequence[Factors]) -> list[RowScalars]:
    """``|a|^2``, ``a.Δ`` and ``|Δ|^2`` per row for each update's ``Δ = s B A``, reading ``W0`` once.

    Args:
        base_rows: ``W0`` as ``(out, in)`` rows (bf16/fp16/fp32/fp64, any device).
        updates: each with ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``, ``scale``.
    Returns:
        One :class:`RowScalars` per update, each field ``(out,)`` float64 on ``base_rows``' device.
    """
    for update in updates:
        if not fits(base_rows, update):
            raise ValueError(
                f"{update.base_name}: factors A {tuple(update.lora_A.shape)}, B {tuple(update.lora_B.shape)} "
                f"do not fit base rows {tuple(base_rows.shape)}"
            )
    results: list[RowScalars] = []
    for group in _groups(updates):
        results += _group_scalars(base_rows, group)
    return results


def _groups(updates: Sequence[Factors]) -> Iterator[list[Factors]]:
    group: list[Factors] = []
    rank = 0
    for update in updates:
        r = update.lora_A.shape[0]
        if group and rank + r > MAX_STACKED_RANK:
            yield group
            group, rank = [], 0
        group.append(update)
        rank += r
    if group:
        yield group


def _group_scalars(base_rows: torch.Tensor, updates: Sequence[Factors]) -> list[RowScalars]:
    device = base_rows.device
    exact = torch.float64 if base_rows.dtype == torch.float64 else torch.float32
    stacked = torch.cat([u.lora_A.to(device=device, dtype=exact) for u in updates])  # (R, in)
    out = base_rows.shape[0]
    projected = torch.empty(out, stacked.shape[0], dtype=exact, device=device)  # W0 A_all^T, (out, R)
    base_sq = torch.empty(out, dtype=torch.float64, device=device)
    stacked_t = stacked.T

    def work(todo: Iterator[tuple[int, int]]) -> None:
        for start, stop in todo:
            a = base_rows[start:stop].to(exact)  # (b, in)
            torch.matmul(a, stacked_t, out=projected[start:stop])
            wide = a.double()
            base_sq[start:stop] = torch.linalg.vecdot(wide, wide)

    run_blocks(base_rows, work, row_blocks(base_rows, BLOCK_ELEMENTS if device.type == "cpu" else None))
    results = []
    offset = 0
    for update in updates:
        r = update.lora_A.shape[0]
        a64 = update.lora_A.to(device=device, dtype=torch.float64)  # (r, in)
        b64 = update.lora_B.to(device=device, dtype=torch.float64)  # (out, r)
        gram = a64 @ a64.T  # (r, r)
        s = float(update.scale)
        dot = s * torch.linalg.vecdot(b64, projected[:, offset : offset + r].double())
        update_sq = (s * s) * torch.linalg.vecdot(b64 @ gram, b64)
        results.append(RowScalars(base_sq, dot, update_sq.clamp_min(0)))
        offset += r
    return results


def low_rank_row_changes(base_rows: torch.Tensor, updates: Sequence[Factors]) -> list[RowChanges]:
    """Per-row changes of each merged adapter weight against ``W0``, from the factors only.

    LoRA merges to ``W0 + s B A``; DoRA (``magnitude`` set) to ``m V / ||V||_c`` with
    ``V = W0 + s B A``, whose row ``j`` has magnitude ``|m_j|`` and ``1 - cos`` to ``a`` equal to
    ``1 - cos(V_j, a)`` for ``m_j > 0`` and ``1 + cos(V_j, a)`` for ``m_j < 0``. Rows with a zero
    base row or a zero merged row are excluded (``valid`` False), as in
    :func:`~dora_analysis.analysis.decomposition.row_changes`; a zero ``V_j`` (where the merge divides 0 by 0)
    makes that row's tuned magnitude NaN, as the merged weight would be.

    Args:
        base_rows: ``W0`` as ``(out, in)`` rows.
        updates: LoRA/DoRA factors fitting ``base_rows`` (see :func:`fits`).
    Returns:
        One :class:`RowChanges` per update, all fields ``(out,)`` float64.
    """
    changes = []
    for update, scalars in zip(updates, factored_scalars(base_rows, updates), strict=True):
        lora = row_changes(scalars)
        if update.magnitude is None:
            changes.append(lora)
        else:
            changes.append(
                _dora_changes(lora, update.magnitude.to(device=base_rows.device, dtype=torch.float64))
            )
    return changes


def _dora_changes(v: RowChanges, magnitude: torch.Tensor) -> RowChanges:
    """Row changes of ``m V / |V|`` from those of ``V`` (``v``) and ``m`` ``(out,)`` float64."""
    m = magnitude.abs()
    v_norm = v.tuned_magnitude
    tuned = torch.where(v_norm > 0, m, torch.full_like(m, math.nan))  # m * 0 / 0 in the merge
    tuned = torch.where(torch.isfinite(v_norm), tuned, v_norm)
    base = v.base_magnitude
    valid = (base > 0) & (m > 0) & (v_norm > 0)
    # v.direction_change is NaN where V_j or a is zero; those rows are invalid here too.
    direction = torch.where(magnitude < 0, 2 - v.direction_change, v.direction_change)
    nan = torch.full_like(m, math.nan)
    return RowChanges(
        base_magnitude=base,
        tuned_magnitude=tuned,
        magnitude_change=torch.where(valid, (m - base).abs(), nan),
        direction_change=torch.where(valid, direction, nan),
        valid=valid,
    )

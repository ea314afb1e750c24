"""A LoRA/DoRA update kept as its factors, and merging it into its base weight: pure tensor math.

LoRA: ``W = W0 + s * B @ A``.  DoRA: ``W = m * V / ||V||_c`` with ``V = W0 + s * B @ A`` and
``||V||_c`` one L2 norm per output unit (a row of PyTorch's ``(out, in)`` layout), as PEFT's
``merge_and_unload`` computes it. The readers merge adapters with it (float32) and the spectral
analysis forms DoRA's dense update with it (float64); both know an update only as :class:`Factors`.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["Factors", "low_rank_fit_problem", "merge_low_rank"]


class Factors(Protocol):
    """A LoRA/DoRA update kept as its factors (the readers' ``LowRankUpdate`` has this shape).

    The math only needs these fields, so it never imports the readers.
    """

    base_name: str  # for messages
    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    scale: float  # s = alpha / r (or alpha / sqrt(r))
    magnitude: torch.Tensor | None  # (out,) for DoRA, None for LoRA
    fan_in_fan_out: bool  # the base weight is stored (in, out) (transformers' Conv1D)


def low_rank_fit_problem(
    base_shape: tuple[int, ...],
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    magnitude_shape: tuple[int, ...] | None = None,
    fan_in_fan_out: bool = False,
) -> str | None:
    """Why factors of these shapes cannot update a base weight of ``base_shape``, or None if they can.

    ``a_shape`` is ``(r, in)``, ``b_shape`` ``(out, r)``, ``magnitude_shape`` ``(out,)``; the base is
    ``(out, in)``, or ``(in, out)`` when ``fan_in_fan_out``.
    """
    if len(a_shape) != 2 or len(b_shape) != 2:
        return f"lora_A {tuple(a_shape)} and lora_B {tuple(b_shape)} must both be 2-D (r, in) and (out, r)"
    if a_shape[0] != b_shape[1]:
        return f"lora_A has rank {a_shape[0]} (rows) but lora_B has rank {b_shape[1]} (columns)"
    out_in = (b_shape[0], a_shape[1])
    expected = (out_in[1], out_in[0]) if fan_in_fan_out else out_in
    layout = "(in, out)" if fan_in_fan_out else "(out, in)"
    if tuple(base_shape) != expected:
        return (
            f"lora_B @ lora_A gives (out, in) = {out_in}, so the base weight should be {layout} = "
            f"{expected}, but it is {tuple(base_shape)}"
        )
    if magnitude_shape is not None and tuple(magnitude_shape) != (out_in[0],):
        return f"the DoRA magnitude has shape {tuple(magnitude_shape)}, expected (out,) = ({out_in[0]},)"
    return None


def merge_low_rank(
    base_weight: torch.Tensor, update: Factors, dtype: torch.dtype = torch.float32, *, rows: bool = False
) -> torch.Tensor:
    """The merged weight in ``dtype`` (float32 for the readers, float64 for the spectral analysis), in
    the base's layout and on its device.

    Args:
        base_weight: ``W0``, ``(out, in)``; ``(in, out)`` when ``update.fan_in_fan_out``, unless ``rows``
            (it is already in row layout, ``(out, in)``, as the analysis holds every weight).
        update: ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``, ``scale``, optional ``magnitude`` ``(out,)``.
        dtype: the dtype every product is taken in. DoRA row norms are always taken in float64.

    Returns:
        A new ``dtype`` tensor of ``base_weight``'s shape. Rows where ``V`` is zero are NaN under DoRA
        (the merge divides 0 by 0 there, as PEFT's does).

    Example:
        >>> from dora_analysis.readers.base import LowRankUpdate
        >>> w0 = torch.eye(2)
        >>> up = LowRankUpdate("w", torch.ones(1, 2), torch.ones(2, 1), scale=0.5)
        >>> merge_low_rank(w0, up).tolist()
        [[1.5, 0.5], [0.5, 1.5]]
    """
    transposed = update.fan_in_fan_out and not rows
    problem = low_rank_fit_problem(
        tuple(base_weight.shape),
        tuple(update.lora_A.shape),
        tuple(update.lora_B.shape),
        None if update.magnitude is None else tuple(update.magnitude.shape),
        transposed,
    )
    if problem:
        raise ValueError(f"{update.base_name}: {problem}")
    w0 = base_weight.to(dtype)
    if transposed:
        w0 = w0.T  # (out, in)
    b = update.lora_B.to(device=w0.device, dtype=dtype)  # (out, r)
    a = update.lora_A.to(device=w0.device, dtype=dtype)  # (r, in)
    v = w0 + update.scale * (b @ a)  # (out, in)
    if update.magnitude is not None:
        norm = torch.linalg.vector_norm(v, dim=1, dtype=torch.float64)  # (out,)
        factor = (update.magnitude.to(device=w0.device, dtype=torch.float64) / norm).to(dtype)  # (out,)
        v = factor[:, None] * v
    return (v.T if transposed else v).contiguous()

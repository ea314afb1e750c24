"""The ways public re-runs of the paper's Figure 2 measured ΔM and ΔD, for the study only.

The paper's convention (Eq. 3/4, and this toolkit's default everywhere else) takes one magnitude per
output unit, the L2 norm of a row of PyTorch's ``(out, in)`` weight, and the cosine between matching
rows; ΔM is the mean of ``|m_t - m_0|``; LoRA/DoRA weights are merged with their scale ``s = α/r``.
Public scripts changed some of these choices (see ``shared/docs/related-work.md``), and their
numbers are not comparable with each other. Each such choice is one named convention here, so the
study can show which of them move r across zero on the same checkpoints:

- ``paper``: rows for both, ``|Δm|``, merged with ``α/r``.
- ``column_cosine``: the cosine over columns (``dim=0``, one per input unit) while the magnitude stays
  over rows, as the one public re-run with numbers did.
- ``signed_magnitude``: ΔM as the mean of ``m_t - m_0`` (growth and shrinkage cancel).
- ``no_scale``: the paper's math on weights merged as ``W_0 + B A``, without ``α/r``. The
  difference is in the merge, which the caller does (:data:`MERGE_SCALED`); the math is ``paper``'s.

``slope`` (a regression slope instead of Pearson r) is not a convention of the per-tensor numbers:
the study reports the slope of every convention beside its r.

These exist for the study. The toolkit's analysis (``compare``, ``series``) always uses ``paper``.
"""

from __future__ import annotations

import torch

__all__ = ["CONVENTIONS", "MERGE_SCALED", "convention_deltas"]

CONVENTIONS: tuple[str, ...] = ("paper", "column_cosine", "signed_magnitude", "no_scale")
#: Whether a convention merges LoRA/DoRA factors with their scale ``α/r`` (all but ``no_scale``).
MERGE_SCALED = {name: name != "no_scale" for name in CONVENTIONS}


def _mean_one_minus_cos(base: torch.Tensor, tuned: torch.Tensor, dim: int) -> float:
    """Mean of ``1 - cos`` between matching slices along ``dim`` of two float64 matrices.

    Slices that are zero in either matrix have no direction and are left out. ``1 - dot / norms`` in
    float64 is exact only to about ``(n + 2)`` units of rounding (``n`` the slice's length: the dot
    product's and the norms' sums), so a value within that of 0 is 0: a direction that did not move
    (magnitude-only DoRA, B = 0) gives ΔD = 0 exactly, never rounding noise a correlation would read.
    """
    dot = (base * tuned).sum(dim)
    norms = torch.linalg.vector_norm(base, dim=dim) * torch.linalg.vector_norm(tuned, dim=dim)
    valid = norms > 0
    if not bool(valid.any()):
        return float("nan")
    one_minus_cos = 1 - dot[valid] / norms[valid]
    resolution = (base.shape[dim] + 2) * torch.finfo(torch.float64).eps
    return float(torch.where(one_minus_cos.abs() <= resolution, 0.0, one_minus_cos).mean())


def convention_deltas(base: torch.Tensor, tuned: torch.Tensor, convention: str) -> tuple[float, float]:
    """``(ΔM, ΔD)`` of ``tuned`` against ``base`` as ``convention`` measures them.

    Args:
        base: ``W_0``, ``(out, in)`` rows in PyTorch's layout, any float dtype.
        tuned: ``W_t``, the same shape (for ``no_scale``, merged without ``α/r`` by the caller).
        convention: one of :data:`CONVENTIONS`.
    Returns:
        ``(delta_magnitude, delta_direction)`` as Python floats, computed in float64.

    Example:
        >>> w0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> convention_deltas(w0, 2 * w0, "paper")
        (1.5, 0.0)
        >>> convention_deltas(w0, 0.5 * w0, "signed_magnitude")
        (-0.75, 0.0)
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")
    if base.dim() != 2 or base.shape != tuned.shape:
        raise ValueError(f"base {tuple(base.shape)} and tuned {tuple(tuned.shape)} must be equal 2-D shapes")
    w0, w = base.to(torch.float64), tuned.to(torch.float64)
    change = torch.linalg.vector_norm(w, dim=1) - torch.linalg.vector_norm(w0, dim=1)  # (out,)
    delta_magnitude = float(change.mean() if convention == "signed_magnitude" else change.abs().mean())
    delta_direction = _mean_one_minus_cos(w0, w, dim=0 if convention == "column_cosine" else 1)
    return delta_magnitude, delta_direction

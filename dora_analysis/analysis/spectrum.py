"""The shape of an update: its singular spectrum, intruder dimensions, and subspace agreement.

For a weight in row layout (``(out, in)``, one row per output unit, as for ΔM/ΔD) and its update
``ΔW = W_t - W_0`` (merged weights), with singular values ``σ_1 >= σ_2 >= ...`` of ``ΔW``:

- ``update_rel_norm`` = ||ΔW||_F / ||W_0||_F
- ``update_stable_rank`` = ||ΔW||_F^2 / σ_1^2
- ``update_effective_rank`` = exp(-Σ p_i log p_i), p_i = σ_i / Σ_j σ_j (Roy & Vetterli 2007)
- ``update_rank90`` = the smallest k with Σ_{i<=k} σ_i^2 >= 0.9 ||ΔW||_F^2 (Biderman et al. 2024)
- ``update_top_singular`` = σ_1
- ``intruder_dimensions``: Shuttleworth et al. 2024 ("LoRA vs Full Fine-tuning: An Illusion of
  Equivalence", Algorithm 1): of the top ``k`` **left** singular vectors of ``W_t`` (the columns of
  ``U_t`` in ``W_t = U_t Σ_t V_tᵀ``, i.e. directions in the *output* space of the ``(out, in)``
  weight, as the paper's code computes them with ``torch.linalg.svd(weight)`` on PyTorch's layout),
  those whose largest |cosine| with every left singular vector of ``W_0`` (all ``min(out, in)`` of
  them, ``full_matrices=False``) is below ``eps``. The absolute value is taken because a singular
  vector's sign is arbitrary. ``intruder_k`` and ``intruder_eps`` beside it say which k (at most the
  matrix's smaller side) and ε the count used.
- subspace agreement, the LoRA paper's (Hu et al. 2021, §7) φ(ΔW_1, ΔW_2, i, j) =
  ||U_1^(i)ᵀ U_2^(j)||_F^2 / min(i, j) in [0, 1], with ``U^(i)`` the top-i left singular vectors of
  each update. Where an update has fewer than ``i`` non-zero singular values (a rank-4 LoRA, a
  zero update), ``i`` is lowered to that rank (numerical rank as NumPy's ``matrix_rank`` counts it),
  so directions spanning a null space are never compared; a zero update gives NaN.

How each update is computed, and what it costs (``out x in`` weight, adapter rank ``r``):

- **LoRA** ``ΔW = s B A`` from the factors: QR of ``B`` ``(out, r)`` and ``Aᵀ`` ``(in, r)``, then the
  SVD of the ``r x r`` core ``s R_B R_Aᵀ``: O((out + in) r^2), no dense matrix. Exact.
- **DoRA** ``ΔW = (diag(g) - I) W_0 + diag(g) s B A`` with ``g = m / ||W_0 + s B A||_c`` is not low
  rank (the first term scales every row of ``W_0``): it is formed densely in float64,
  O(out · in · r), and its SVD costs as much as a full fine-tuning update's.
- **Dense** updates (full fine-tuning, any tuned tensor without factors): ``W_t - W_0`` in float64
  and ``torch.linalg.svdvals`` (or ``svd`` where vectors are needed): O(out · in · min(out, in)).
- **Intruders** need the top-k left singular vectors of the dense ``W_t`` for every method (a LoRA
  ``W_t = W_0 + s B A`` is full rank), and all left singular vectors of ``W_0``, computed once per
  tensor (:class:`BaseSpectrum`) and shared by every checkpoint of a series.

All SVDs run in float64 on the device the rows are on (CPU by default). With
``SpectrumOptions(svd_rank=q)`` the per-checkpoint dense SVDs (FT/DoRA updates and ``W_t`` for
intruders) use a randomised range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4: a Gaussian test
matrix with ``w = q + 10`` columns, ``power_iterations`` subspace iterations, then an exact SVD of the
small projection ``B = QᵀW``) instead, O(out · in · w · (2 · power_iterations + 1)). Every one of the
``w`` values it computes is kept. What is known rigorously about them (``R = (I - QQᵀ)W``, so
``WᵀW = BᵀB + RᵀR``):

- each computed σ̃_i <= σ_i (Cauchy interlacing) and σ_i^2 <= σ̃_i^2 + ||R||_2^2 (Weyl);
- the top-j energy: Σ_{i<=j} σ̃_i^2 <= Σ_{i<=j} σ_i^2 <= Σ_{i<=j} σ̃_i^2 + ||R||_F^2 (Ky Fan), with
  ||R||_F^2 = ||W||_F^2 - Σ σ̃_i^2 exact but for rounding.

So ``update_rank90_lower``/``update_rank90_upper`` bracket rank90 (:func:`rank90_bounds`), and
``update_rank90`` is reported only where they meet (NaN otherwise); ``update_effective_rank`` needs
every σ and is NaN on this path. ``update_rel_norm`` and ``update_stable_rank`` use the exact
||ΔW||_F; ``update_top_singular`` is σ̃_1, at most σ_1 (accurate where the spectrum decays: see
Halko et al. Cor. 10.10 for its expected error), so ``update_stable_rank`` is then at least the
true one. The base's SVD stays exact.

Singular *vectors* from the randomised path are accurate only where the spectrum has a gap after
them: on a flat top spectrum the unchecked intruder count came out 9 where the exact SVD finds 0,
and a near-degenerate pair σ_k ≈ σ_(k+1) rotates the k-th vector within the pair. So the
randomised intruder count is certified (:func:`randomized_intruders`): each top-k vector's angle to
the true one is bounded by a one-vector Davis-Kahan bound (:func:`vector_errors`) whose gap is
measured against a lower bound on σ_(i-1) (interlacing) and an upper bound on σ_(i+1)
(:func:`neighbour_bounds`: Weyl, or sharper a quadratic bound from the converged pairs' residuals,
both with an upper bound on ||R||_2: ||R||_F, or :func:`remainder_norm_bound`, which fails with
probability at most 1e-12 over its own Gaussian draws); the count is returned only where no bound lets a cosine
cross ε. The k-th vector always has 10 computed values below it (``max(svd_rank, k) + 10`` are
computed). Failing that, the rank is doubled and the power iterations go 4, 9, 19, ... while that
costs less than the exact SVD, and then the matrix gets the exact SVD. φ from randomised vectors is
not checked this way (it is continuous in them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dora_analysis.analysis import fused_rows
from dora_analysis.factors import Factors, merge_low_rank
from dora_analysis.schema import (
    INTRUDER_COLUMNS,
    RANK90_LOWER,
    RANK90_UPPER,
    SPECTRUM_COLUMNS,
    SUBSPACE_COLUMN,
)

__all__ = [
    "SpectrumOptions",
    "Remainder",
    "PartialSVD",
    "update_metrics",
    "partial_remainder",
    "rank90_bounds",
    "vector_errors",
    "ritz_couplings",
    "neighbour_bounds",
    "remainder_norm_bound",
    "randomized_intruders",
    "factored_svd",
    "dense_svd",
    "randomized_svd",
    "intruder_count",
    "subspace_similarity",
    "numerical_rank",
    "BaseSpectrum",
    "tensor_spectra",
]

# The output columns (SPECTRUM_COLUMNS, INTRUDER_COLUMNS, SUBSPACE_COLUMN, the rank90 bounds) and the
# metric groups live in :mod:`dora_analysis.schema`, with every other column of the frames.

# Oversampling of the randomised range finder (Halko et al. recommend 5-10). Every computed value is
# kept: the oversampled ones are the computed neighbours below the top q.
OVERSAMPLE = 10
# Matrices with at least this many elements (a 2048 x 2048 weight) are decomposed on every core.
PARALLEL_ELEMENTS = 1 << 22
# The randomised bound on ||(I - UUᵀ)W||_2 (:func:`remainder_norm_bound`): Gaussian samples, power
# steps, and the probability that it is below the true norm (for any matrix, over the random draws).
REMAINDER_SAMPLES = 8
REMAINDER_POWER = 16
REMAINDER_FAILURE = 1e-12
# First-order rounding of a product of float64 matrices (Higham 2002, §3.5: |fl(AB) - AB| <= γ_n|A||B|),
# as a multiple of (m + n) · eps · ||W||_F^2, doubled for the Rayleigh quotient and the normalisation.
ROUNDING = 4


@dataclass(frozen=True)
class SpectrumOptions:
    """How the spectral columns are computed.

    ``intruder_k``/``intruder_eps``: Algorithm 1's k and ε. ``subspace_dim``: i = j of φ.
    ``svd_rank``: None for exact dense SVDs; q for the randomised top-q SVD of dense updates
    (see the module docstring for what it guarantees; the intruder count computes at least
    ``intruder_k + 10`` values). ``power_iterations``: of the randomised path.
    """

    intruder_k: int = 10
    intruder_eps: float = 0.5
    subspace_dim: int = 8
    svd_rank: int | None = None
    power_iterations: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.intruder_k < 1:
            raise ValueError(f"intruder_k must be at least 1, got {self.intruder_k}")
        if not 0 < self.intruder_eps <= 1:
            raise ValueError(f"intruder_eps must be in (0, 1], got {self.intruder_eps}")
        if self.subspace_dim < 1:
            raise ValueError(f"subspace_dim must be at least 1, got {self.subspace_dim}")
        if self.svd_rank is not None and self.svd_rank < 1:
            raise ValueError(f"svd_rank must be at least 1, got {self.svd_rank}")


# ------------------------------------------------------------------------------------ the numbers


@dataclass(frozen=True)
class Remainder:
    """What a partial (randomised) spectrum of ``ΔW`` ``(m, n)`` leaves out.

    ``frob_sq``: an upper bound on ||(I - UUᵀ)ΔW||_F^2 = ||ΔW||_F^2 - Σ σ̃_i^2 (the computed values
    being those of ``UᵀΔW``); ``dims``: min(m, n), the most non-zero singular values ``ΔW`` can have.
    """

    frob_sq: float
    dims: int


def partial_remainder(sigma: torch.Tensor, frob_sq: float, shape: tuple[int, int]) -> Remainder:
    """The :class:`Remainder` of the computed values ``sigma`` ``(w,)`` of a ``shape`` matrix with
    ||ΔW||_F^2 = ``frob_sq``; the two sums of squares are rounded by at most m · n · eps of it each."""
    computed = float(sigma.double().square().sum())
    rounding = 2 * shape[0] * shape[1] * torch.finfo(torch.float64).eps * frob_sq
    return Remainder(max(frob_sq - computed, 0.0) + rounding, min(shape))


def update_metrics(
    sigma: torch.Tensor, frob_sq: float, base_frob_sq: float, remainder: Remainder | None = None
) -> dict:
    """The spectrum columns from the singular values of ``ΔW``.

    Args:
        sigma: ``(q,)`` singular values, descending: all of them, or (with ``remainder``) the ``w``
            computed by a randomised SVD, each at most the true one.
        frob_sq: ||ΔW||_F^2, exact.
        base_frob_sq: ||W_0||_F^2.
        remainder: None where ``sigma`` is the whole spectrum; else what it leaves out. Then
            rank90 is bracketed (:func:`rank90_bounds`) and reported only where the bounds meet, and
            the effective rank (it needs every σ) is NaN.
    Returns:
        ``{column: float}``; a zero update has norm 0, rank90 0 and NaN ranks.
    """
    sigma = sigma.detach().double().cpu()
    top = float(sigma[0]) if sigma.numel() else 0.0
    rel = math.sqrt(frob_sq / base_frob_sq) if base_frob_sq > 0 else math.nan
    if frob_sq <= 0:
        return dict(zip(SPECTRUM_COLUMNS, (rel, math.nan, math.nan, 0.0, 0.0, 0.0, 0.0), strict=True))
    if not (top > 0 and math.isfinite(frob_sq)):  # non-finite, or nothing computed: nothing is known
        return dict(zip(SPECTRUM_COLUMNS, (rel,) + (math.nan,) * 6, strict=True))
    if remainder is None:
        energy = torch.cumsum(sigma * sigma, 0)
        # the whole spectrum's energy is Σσ² itself (consistent rounding)
        rank90 = float(int(torch.nonzero(energy >= 0.9 * float(energy[-1]))[0]) + 1)
        p = sigma[sigma > 0] / sigma.sum()
        effective = math.exp(float(-(p * p.log()).sum()))
        lower = upper = rank90
    else:
        lower, upper = rank90_bounds(sigma, frob_sq, remainder)
        rank90, effective = (lower if lower == upper else math.nan), math.nan
    return {
        "update_rel_norm": rel,
        "update_stable_rank": frob_sq / (top * top),
        "update_effective_rank": effective,
        "update_rank90": rank90,
        "update_top_singular": top,
        RANK90_LOWER: lower,
        RANK90_UPPER: upper,
    }


def rank90_bounds(sigma: torch.Tensor, frob_sq: float, remainder: Remainder) -> tuple[float, float]:
    """Rigorous ``(lower, upper)`` bounds on rank90 from the ``w`` values ``sigma`` of ``UᵀΔW``.

    With ``B = UᵀΔW`` and ``R = (I - UUᵀ)ΔW``, ``ΔWᵀΔW = BᵀB + RᵀR`` (both PSD), so by Ky Fan's
    maximum principle the top-j energy ``E_j = Σ_{i<=j} σ_i^2`` satisfies
    ``Σ_{i<=j} σ̃_i^2 <= E_j <= Σ_{i<=j} σ̃_i^2 + ||R||_F^2``. rank90 (the first j with
    ``E_j >= 0.9 ||ΔW||_F^2``) is at most the first j where the lower sum reaches it (``dims`` where
    no computed one does) and at least the first j where the upper one does.
    """
    energy = torch.cumsum(sigma.double().square(), 0)  # (w,)
    target = 0.9 * frob_sq
    reached = torch.nonzero(energy >= target)
    upper = float(int(reached[0]) + 1) if len(reached) else float(remainder.dims)
    possible = torch.nonzero(energy + remainder.frob_sq >= target)
    lower = float(int(possible[0]) + 1) if len(possible) else float(sigma.numel() + 1)
    return lower, upper


def factored_svd(
    lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values of ``s B A`` from the factors, float64.

    ``B = Q_B R_B``, ``Aᵀ = Q_A R_A`` (reduced QR), so ``s B A = Q_B (s R_B R_Aᵀ) Q_Aᵀ`` and the SVD
    of the ``r x r`` core gives those of the product. O((out + in) r^2).

    Args:
        lora_B: ``(out, r)``; lora_A: ``(r, in)``; scale: ``s``.
    Returns:
        ``U`` ``(out, r')`` and ``σ`` ``(r',)`` descending, ``r' = min(r, out, in)``.
    """
    b = lora_B.double()
    a = lora_A.double()
    q_b, r_b = torch.linalg.qr(b)  # (out, r'), (r', r)
    q_a, r_a = torch.linalg.qr(a.T)  # (in, r''), (r'', r)
    core = float(scale) * (r_b @ r_a.T)  # (r', r'')
    u_core, sigma, _ = torch.linalg.svd(core, full_matrices=False)
    return q_b @ u_core, sigma


class PartialSVD(NamedTuple):
    """A randomised SVD ``W ≈ U diag(σ) Vᵀ`` of ``W`` ``(m, n)``: ``U = Q Ũ`` (the range finder's whole
    orthonormal basis ``Q``, rotated), ``σ`` and ``V = Ṽ`` from the exact SVD ``QᵀW = Ũ diag(σ) Ṽᵀ``.

    ``left`` ``(m, w)``, ``sigma`` ``(w,)`` descending, ``right`` ``(n, w)``; ``σ_i`` <= the true i-th
    singular value (Cauchy interlacing: the singular values of ``QᵀW``), and ``Wᵀ u_i = σ_i v_i`` exactly.
    """

    left: torch.Tensor
    sigma: torch.Tensor
    right: torch.Tensor


def randomized_svd(matrix: torch.Tensor, rank: int, power_iterations: int = 4, seed: int = 0) -> PartialSVD:
    """Every value and vector the randomised range finder computes for ``matrix`` ``(m, n)``.

    Halko, Martinsson & Tropp 2011, Alg. 4.4 (subspace iteration, re-orthonormalised each half step)
    with ``w = min(rank + 10, m, n)`` samples; deterministic for a given ``seed``. All ``w`` are
    returned: the top ``rank`` are the answer, the oversampled ones their computed neighbours below.
    """
    m, n = matrix.shape
    width = min(rank + OVERSAMPLE, m, n)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    omega = torch.randn(n, width, generator=generator, dtype=matrix.dtype, device=matrix.device)
    q, _ = torch.linalg.qr(matrix @ omega)  # (m, width)
    for _ in range(power_iterations):
        z, _ = torch.linalg.qr(matrix.T @ q)  # (n, width)
        q, _ = torch.linalg.qr(matrix @ z)
    u_small, sigma, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)  # (width, width), (width, n)
    return PartialSVD(q @ u_small, sigma, vh.T)


def dense_svd(
    matrix: torch.Tensor, options: SpectrumOptions, vectors: bool, rank: int | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, bool]:
    """``(U or None, σ, complete)`` of a float64 ``(m, n)`` matrix: exact, or randomised (``options.svd_rank``).

    ``rank``: how many singular values the caller needs at least (the randomised path computes
    ``max(rank, svd_rank)`` and returns all ``+ 10`` it computed). ``complete``: σ is the whole spectrum.
    """
    target = options.svd_rank
    if target is not None and rank is not None:
        target = max(target, rank)
    if target is None or target + OVERSAMPLE >= min(matrix.shape):
        if not vectors:
            return None, torch.linalg.svdvals(matrix), True
        u, sigma, _ = torch.linalg.svd(matrix, full_matrices=False)
        return u, sigma, True
    partial = randomized_svd(matrix, target, options.power_iterations, options.seed)
    return (partial.left if vectors else None), partial.sigma, False


def _project_out(basis: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``(I - UUᵀ) block``, twice (one Gram-Schmidt pass leaves rounding along ``U`` that the power
    steps would amplify)."""
    for _ in range(2):
        block = block - basis @ (basis.T @ block)
    return block


def remainder_norm_bound(matrix: torch.Tensor, basis: torch.Tensor, seed: int = 0) -> float:
    """An upper bound on ||R||_2, ``R = (I - UUᵀ) W``, ``U = basis`` ``(m, w)`` orthonormal, that fails
    with probability at most :data:`REMAINDER_FAILURE` over its Gaussian draws, for every ``W``.

    For Gaussian ``ω`` ``(n,)`` and ``C = RᵀR`` (eigenvalues ``λ_1 >= ...``), ``||C^p ω||^2 =
    Σ λ_j^{2p} g_j^2 >= λ_1^{2p} g_1^2`` with ``g_1 ~ N(0, 1)``, so ``λ_1 <= (||C^p ω|| / t)^{1/p}``
    unless ``|g_1| < t``, which has probability <= t sqrt(2/π). With s independent samples, all miss
    with probability <= (t sqrt(2/π))^s: ``t`` is set so that this is :data:`REMAINDER_FAILURE`.
    Rounding is the caller's (:data:`ROUNDING`). Cost: 2p products of ``W`` with ``(·, s)`` blocks.
    """
    samples, power = REMAINDER_SAMPLES, REMAINDER_POWER
    threshold = REMAINDER_FAILURE ** (1 / samples) / math.sqrt(2 / math.pi)
    generator = torch.Generator(device=matrix.device).manual_seed(seed + 1)  # not the range finder's Ω
    y = torch.randn(matrix.shape[1], samples, generator=generator, dtype=matrix.dtype, device=matrix.device)
    log_norm = torch.zeros(samples, dtype=torch.float64, device=matrix.device)
    tiny = torch.finfo(torch.float64).tiny
    for _ in range(power):
        y = matrix.T @ _project_out(basis, matrix @ y)  # C y, (n, s)
        norms = torch.linalg.vector_norm(y, dim=0).clamp(min=tiny)
        log_norm += norms.log()
        y = y / norms
    lambda_bound = math.exp((float(log_norm.max()) - math.log(threshold)) / power)
    return math.sqrt(lambda_bound)


def ritz_couplings(matrix: torch.Tensor, partial: PartialSVD) -> torch.Tensor:
    """``σ̃_j^2 ||W ṽ_j - σ̃_j u_j||^2`` ``(w,)``: how strongly each computed pair couples to what the
    range finder missed (``u_jᵀ WWᵀ (I - UUᵀ) = σ̃_j r_jᵀ``, ``r_j`` the pair's residual). O(m n w)."""
    residual = matrix @ partial.right - partial.left * partial.sigma  # (m, w)
    return partial.sigma.square() * residual.square().sum(0)


def neighbour_bounds(
    values: torch.Tensor, k: int, remainder: float, couplings: torch.Tensor | None = None
) -> torch.Tensor:
    """Upper bounds on σ_(i+1)^2 for i = 1..k ``(k,)``, from the computed ``values`` σ̃^2 ``(w,)``,
    ``remainder`` >= ||R||_2 and (optionally) :func:`ritz_couplings`.

    Weyl: σ_(i+1)^2 <= σ̃_(i+1)^2 + ||R||_2^2. Sharper where the pairs after i have converged: by
    Cauchy, σ_(i+1)^2 <= λ_1 of ``WWᵀ`` compressed to the complement of ``u_1..u_i``; split that into
    the pairs ``i+1..t`` (block A, top σ̃_(i+1)^2) and the rest (block C: pairs ``t+1..w`` and the
    missed space, top <= σ̃_(t+1)^2 + ||R||_2^2), coupled only through the residuals (Ritz vectors
    are orthogonal in ``WWᵀ``): ``||E||^2 <= Σ_(j in A) couplings_j``. For a 2 x 2 block Hermitian
    matrix with λ_1(A) > λ_1(C), λ_1 <= λ_1(A) + ||E||^2 / (λ_1(A) - λ_1(C)) (eliminate the C part of
    the top eigenvector). The smallest over every split t is taken.
    """
    weyl = values[1 : k + 1] + remainder * remainder
    if couplings is None:
        return weyl
    bounds = []
    for i in range(k):
        below = values[i + 1]
        coupled = torch.cumsum(couplings[i + 1 :], 0)  # ||E||^2 for t = i+1 .. w
        top_c = torch.cat([values[i + 2 :], values.new_zeros(1)]) + remainder * remainder
        margin = below - top_c
        quadratic = torch.where(margin > 0, below + coupled / margin, torch.full_like(margin, math.inf))
        bounds.append(torch.minimum(weyl[i], quadratic.min()))
    return torch.stack(bounds)


def vector_errors(
    matrix: torch.Tensor,
    partial: PartialSVD,
    k: int,
    remainder: float,
    couplings: torch.Tensor | None = None,
) -> torch.Tensor:
    """Upper bounds on ``sin θ_i`` between each of the first ``k`` vectors ``partial.left`` ``(m, w)``
    of a randomised SVD of ``matrix`` ``(m, n)`` and the true i-th left singular vector; ``(k,)``,
    1 where no bound below 1 holds. Needs ``w > k`` (a computed neighbour below the k-th value).

    Davis-Kahan for one vector: for unit ``u``, any ``ρ`` and ``M = WWᵀ`` with eigenpairs ``(λ_j, x_j)``,
    ``||Mu - ρu||^2 = Σ (uᵀx_j)^2 (λ_j - ρ)^2 >= δ^2 sin^2 θ``, θ the angle from ``u`` to the
    eigenvectors with ``λ_j`` in ``(ρ - δ, ρ + δ)``. ``δ`` is taken so that only ``σ_i^2`` can lie
    there, from rigorous bounds on its neighbours: ``σ_(i-1)^2 >= σ̃_(i-1)^2`` (interlacing) above,
    and :func:`neighbour_bounds` below (``remainder`` >= ||R||_2, ``R = (I - UUᵀ)W``; ``couplings``
    from :func:`ritz_couplings` sharpen it). Rounding: :data:`ROUNDING`.
    """
    m, n = matrix.shape
    values = partial.sigma.square()
    if values.numel() <= k:
        raise ValueError(f"vector_errors needs more than k = {k} computed values, got {values.numel()}")
    frob_sq = float(torch.linalg.vector_norm(matrix) ** 2)
    slack = ROUNDING * (m + n) * torch.finfo(torch.float64).eps * frob_sq
    if couplings is not None:  # each ||σ̃_j r_j|| is rounded by at most σ̃_j γ_n ||W||_F < slack
        couplings = (couplings.sqrt() + slack).square()
    u = partial.left[:, :k]
    u = u / torch.linalg.vector_norm(u, dim=0)
    t = matrix.T @ u  # (n, k)
    rayleigh = t.square().sum(0)  # (k,) uᵀ W Wᵀ u
    residual = torch.linalg.vector_norm(matrix @ t - u * rayleigh, dim=0) + slack  # (k,)
    upper = neighbour_bounds(values, k, remainder, couplings) + slack  # bounds on σ_(i+1)^2
    lower = torch.cat([values.new_full((1,), math.inf), values[: k - 1] - slack])  # bounds on σ_(i-1)^2
    gap = torch.minimum(rayleigh - upper, lower - rayleigh)
    return torch.where(gap > 0, residual / gap, torch.ones_like(gap)).clamp(max=1.0)


def numerical_rank(sigma: torch.Tensor, shape: tuple[int, int]) -> int:
    """How many of ``sigma`` exceed NumPy ``matrix_rank``'s tolerance σ_1 · max(m, n) · eps(float64)."""
    if sigma.numel() == 0 or float(sigma[0]) <= 0:
        return 0
    tolerance = float(sigma[0]) * max(shape) * torch.finfo(torch.float64).eps
    return int((sigma > tolerance).sum())


def intruder_count(tuned_left: torch.Tensor, base_left: torch.Tensor, eps: float) -> int:
    """How many columns of ``tuned_left`` ``(out, k)`` have max |cos| < ``eps`` with every column of
    ``base_left`` ``(out, n)`` (both orthonormal, so the dot product is the cosine)."""
    cosines = (tuned_left.T @ base_left).abs()  # (k, n)
    return int((cosines.max(dim=1).values < eps).sum())


def subspace_similarity(u1: torch.Tensor, u2: torch.Tensor) -> float:
    """φ = ||U1ᵀ U2||_F^2 / min(i, j) for orthonormal ``u1`` ``(out, i)`` and ``u2`` ``(out, j)``;
    NaN where either is empty (a zero update)."""
    i, j = u1.shape[1], u2.shape[1]
    if min(i, j) == 0:
        return math.nan
    return float(torch.linalg.matrix_norm(u1.T @ u2) ** 2) / min(i, j)


# ----------------------------------------------------------------------------- one tensor, a series


class BaseSpectrum:
    """The base tensor's float64 rows, ||W_0||_F^2 and (on first use) its left singular vectors.

    Built once per tensor and shared by every checkpoint compared with it.
    """

    def __init__(self, base_rows: torch.Tensor) -> None:
        self.rows = base_rows.to(torch.float64)  # (out, in)
        self.frob_sq = float(torch.linalg.vector_norm(self.rows) ** 2)
        self._left: torch.Tensor | None = None

    @property
    def left(self) -> torch.Tensor:
        """``U_0`` ``(out, min(out, in))``: every left singular vector of ``W_0``, exact."""
        if self._left is None:
            self._left = torch.linalg.svd(self.rows, full_matrices=False)[0]
        return self._left


Update = Factors | Callable[[], torch.Tensor]


def tensor_spectra(
    base_rows: torch.Tensor,
    updates: Sequence[Update],
    metrics: Collection[str],
    options: SpectrumOptions | None = None,
    references: Sequence[int | None] | None = None,
) -> list[dict[str, float]]:
    """The spectral columns of every update of one base tensor.

    Args:
        base_rows: ``W_0`` ``(out, in)`` in row layout, any float dtype and device.
        updates: per tuned checkpoint, its LoRA/DoRA :class:`Factors` (matching ``base_rows``), or a
            callable returning its tuned rows ``(out, in)`` (called once, dropped after use).
        metrics: which groups: ``"spectrum"`` and/or ``"intruders"`` (others are ignored).
        options: :class:`SpectrumOptions` (default: exact, k = 10, ε = 0.5, i = j = 8).
        references: per update, the index of the update its φ is taken to (None: no φ); given at
            all, every record gets :data:`SUBSPACE_COLUMN`.
    Returns:
        One ``{column: value}`` per update, in order.
    """
    options = options or SpectrumOptions()
    spectrum = "spectrum" in metrics
    intruders = "intruders" in metrics
    want_vectors = references is not None and any(r is not None for r in references)
    needed = {r for r in (references or ()) if r is not None} | {
        i for i, r in enumerate(references or ()) if r is not None
    }
    records: list[dict[str, float]] = []
    left: dict[int, torch.Tensor] = {}
    with _all_threads(base_rows.numel() >= PARALLEL_ELEMENTS):
        base = BaseSpectrum(base_rows)
        finite_base = bool(torch.isfinite(base.rows).all())
        for index, update in enumerate(updates):
            record: dict[str, float] = {}
            vectors = want_vectors and index in needed
            tuned = None
            if callable(update):
                tuned = update().to(device=base.rows.device, dtype=torch.float64)
            if not finite_base or (tuned is not None and not bool(torch.isfinite(tuned).all())):
                records.append(_nan_record(spectrum, intruders, base.rows.shape, options))  # no SVD
                continue
            if spectrum or vectors:
                u, sigma, remainder, frob_sq = _update_svd(base, update, tuned, options, vectors)
                if spectrum:
                    record.update(update_metrics(sigma, frob_sq, base.frob_sq, remainder))
                if vectors:
                    keep = min(options.subspace_dim, numerical_rank(sigma, tuple(base.rows.shape)))
                    left[index] = u[:, :keep]
            if intruders:
                weight = (
                    tuned
                    if tuned is not None
                    else merge_low_rank(base.rows, update, torch.float64, rows=True)
                )
                record["intruder_dimensions"] = _intruders(base, weight, options)
                record.update(_intruder_setting(base.rows.shape, options))
            records.append(record)
            del tuned
        if references is not None:
            for index, record in enumerate(records):
                target = references[index]
                have = target is not None and index in left and target in left
                record[SUBSPACE_COLUMN] = subspace_similarity(left[index], left[target]) if have else math.nan
    return records


def _update_svd(
    base: BaseSpectrum, update: Update, tuned: torch.Tensor | None, options: SpectrumOptions, vectors: bool
) -> tuple[torch.Tensor | None, torch.Tensor, Remainder | None, float]:
    """``(U, σ, remainder, ||ΔW||_F^2)`` of one update, from the factors where it is a LoRA;
    ``remainder`` is None where σ is the whole spectrum (:func:`update_metrics`)."""
    if tuned is None and update.magnitude is None:  # LoRA: rank r, from the factors
        u, sigma = factored_svd(
            update.lora_B.to(base.rows.device), update.lora_A.to(base.rows.device), update.scale
        )
        return u, sigma, None, float((sigma * sigma).sum())
    weight = (
        tuned if tuned is not None else merge_low_rank(base.rows, update, torch.float64, rows=True)
    )  # FT, DoRA: dense
    delta = weight - base.rows
    del weight
    frob_sq = float(torch.linalg.vector_norm(delta) ** 2)
    if not math.isfinite(frob_sq):  # a DoRA row with V = 0
        return torch.empty(delta.shape[0], 0, dtype=torch.float64), torch.full((1,), math.nan), None, math.nan
    u, sigma, complete = dense_svd(delta, options, vectors, rank=options.subspace_dim if vectors else None)
    remainder = None if complete else partial_remainder(sigma, frob_sq, tuple(delta.shape))
    return u, sigma, remainder, frob_sq


def _intruders(base: BaseSpectrum, weight: torch.Tensor, options: SpectrumOptions) -> float:
    if not bool(torch.isfinite(weight).all()):
        return math.nan
    k = min(options.intruder_k, *weight.shape)
    if options.svd_rank is not None:
        count = randomized_intruders(weight, base.left, k, options)
        if count is not None:
            return float(count)
    # not certified (a flat or near-degenerate top spectrum): count from the exact SVD
    u = torch.linalg.svd(weight, full_matrices=False)[0][:, :k]
    return float(intruder_count(u, base.left, options.intruder_eps))


def randomized_intruders(
    weight: torch.Tensor, base_left: torch.Tensor, k: int, options: SpectrumOptions
) -> int | None:
    """The intruder count of ``weight`` ``(out, in)`` from a randomised SVD, certified, or None.

    Computes ``max(svd_rank, k) + 10`` values (so the k-th always has computed neighbours below it);
    each top-k vector's distance to the true one is bounded (:func:`vector_errors`) and the count is
    returned only where no vector's largest |cos| can lie on the other side of ``eps``. Otherwise
    the rank is doubled and the power iterations go 4, 9, 19, ... while the attempts together cost
    less than the exact SVD (``(2p + 1) w`` against ``min(out, in)``); then None.
    """
    dims = min(weight.shape)
    target, iterations = max(options.svd_rank or k, k), options.power_iterations
    spent = 0
    while target + OVERSAMPLE < dims:
        spent += (2 * iterations + 1) * (target + OVERSAMPLE)
        partial = randomized_svd(weight, target, iterations, options.seed)
        count = _certified_intruders(weight, partial, k, base_left, options)
        if count is not None:
            return count
        target, iterations = 2 * target, 2 * iterations + 1
        if spent + (2 * iterations + 1) * (target + OVERSAMPLE) > dims:
            break
    return None


def _certified_intruders(
    weight: torch.Tensor, partial: PartialSVD, k: int, base_left: torch.Tensor, options: SpectrumOptions
) -> int | None:
    """The intruder count of ``partial``'s top-k vectors, or None where a vector's error bound could
    move its largest |cos| across ``eps``.

    A unit ``u`` within angle θ of ``±x`` has ``||u ∓ x|| = sqrt(2 - 2 cos θ)``, and the largest |cos|
    with a set of unit vectors is 1-Lipschitz, so it moves by at most that. The remainder bound is
    tried cheapest first: ||R||_F (deterministic), then, where ||R||_2 = 0 would certify, the
    randomised :func:`remainder_norm_bound` (never above ||R||_F).
    """
    eps = options.intruder_eps
    left = partial.left[:, :k]
    cosines = (left.T @ base_left).abs().max(dim=1).values  # (k,)
    # rounding of the unit dot products (both sides orthonormal to about m · eps)
    margins = (cosines - eps).abs() - 4 * weight.shape[0] * torch.finfo(torch.float64).eps

    couplings = ritz_couplings(weight, partial)

    def certified(remainder: float) -> bool:
        sines = vector_errors(weight, partial, k, remainder, couplings)
        cos = torch.sqrt((1 - sines.square()).clamp(min=0))
        moves = sines * torch.sqrt(2 / (1 + cos))  # sqrt(2 - 2 cos θ), without cancellation
        return bool((moves < margins).all())

    frob_sq = float(torch.linalg.vector_norm(weight) ** 2)
    frobenius = math.sqrt(partial_remainder(partial.sigma, frob_sq, tuple(weight.shape)).frob_sq)
    if certified(frobenius):
        return int((cosines < eps).sum())
    if not certified(0.0):
        return None
    bound = min(frobenius, remainder_norm_bound(weight, partial.left, options.seed))
    return int((cosines < eps).sum()) if certified(bound) else None


def _intruder_setting(shape: tuple[int, ...], options: SpectrumOptions) -> dict[str, float]:
    """The k and ε an intruder count of a ``shape`` matrix uses (k is at most its smaller side)."""
    return {"intruder_k": min(options.intruder_k, *shape), "intruder_eps": options.intruder_eps}


def _nan_record(
    spectrum: bool, intruders: bool, shape: tuple[int, ...], options: SpectrumOptions
) -> dict[str, float]:
    """NaN for every column the groups add, but the intruder setting, which is known without an SVD."""
    columns = (SPECTRUM_COLUMNS if spectrum else []) + (INTRUDER_COLUMNS if intruders else [])
    return dict.fromkeys(columns, math.nan) | (_intruder_setting(shape, options) if intruders else {})


@contextmanager
def _all_threads(enabled: bool = True) -> Iterator[None]:
    """SVDs of large matrices use every core, also inside the comparison's single-threaded region.

    Only large ones (:data:`PARALLEL_ELEMENTS`): an SVD is hundreds of BLAS calls, and on a loaded
    machine each multi-threaded call stalls until all its threads get a core (measured: a series of
    384 x 384 SVDs took 18x longer with 2 threads than with 1 at load 15 on 2 cores).
    """
    workers = fused_rows.worker_count() if enabled else torch.get_num_threads()
    previous = torch.get_num_threads()
    if workers != previous:
        torch.set_num_threads(workers)
    try:
        yield
    finally:
        if workers != previous:
            torch.set_num_threads(previous)
